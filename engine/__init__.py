"""Tern engine: GGUF I/O, tokenizer, chat formats, sampling, decoders and downloads. Never imports Qt."""
__version__ = "0.1.0"
