"""The other side of a comparison, captured in refprism's names and layout (crosscheck.capture.Capture).

    hf.py        HF transformers, live (forward hooks on every op)
    tl.py        TransformerLens 4's TransformerBridge (its hook names mapped to refprism's sites)
    llamacpp.py  llama.cpp: llama-debug's printed tensors and llama-cpp-python's logits; its weight types
    dumps.py     a file of arrays from any port (refprism, hf, tl or llama.cpp names)

May import: crosscheck.capture, gemma, checkpoints, errors, files (never the comparison itself).
"""
