"""The other side of a comparison, captured in refprism's names and layout (crosscheck.capture.Capture).

    hf.py        HF transformers, live (forward hooks on every op)
    tl.py        TransformerLens 4's TransformerBridge (its hook names mapped to refprism's sites)
    llamacpp.py  llama.cpp: its tools (built by tools/build_llama_cpp.py), llama-cpp-python's logits, the capture
    llamacpp_debug.py  llama-debug's printout (and dumps in llama.cpp's graph names) -> refprism's sites
    gguf_header.py  a GGUF file's header: metadata, tensor types, the weight type of each product
    dumps.py     a file of arrays from any port (refprism, hf, tl or llama.cpp names)

May import: crosscheck.capture, gemma, checkpoints, errors, files (never the comparison itself).
"""
