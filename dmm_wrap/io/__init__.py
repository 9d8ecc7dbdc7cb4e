"""Files and the Hugging Face Hub: safetensors saves, atomic writes, model cards, push."""
