"""Loading a base model, tokenizer or export (dtype, device, safetensors), the architecture table."""
