"""Checkpoints: files in, arrays out.

    safetensors.py  HF model directories (single or sharded safetensors, strict names and shapes), the hub download
    gguf.py         llama.cpp's GGUF files (read and dequantized by the gguf package), with their tokenizer
    synth.py        random checkpoints of any Gemma shape, written as HF would (tests and experiments)

Every reader hands `gemma.weights.Weights` HF-named tensors; nothing here computes with them.
May import: gemma, errors, files.
"""
