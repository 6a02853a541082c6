"""The architecture: one forward pass of a Gemma text decoder in NumPy, and one record of every site it computes.

Mechanism: pure functions over arrays (ops.py, one axis legend), composed by `forward` into the whole decoder;
every activation is recorded under a stable name (record.py's table), and one edit hook (`forward(edit=...)`) lets
compare's replay, patching and freezing change any site before it flows on.

    config.py   Config: the architecture's numbers, read from an HF config.json (Gemma 1, 2, 3)
    ops.py      the ops (RMSNorm with 1 + w, split-half RoPE, tanh GELU, soft-cap, causal softmax, attention, GeGLU)
    weights.py  Weights: the parameters in refprism's per-head layout and compute dtype (fast or low memory)
    forward.py  forward / forward_packed: tokens -> Record
    record.py   Record, the table of every site's name and shape, selections, memory estimates

May import: errors, files only (this is the bottom layer; checkpoints, model and every capability import it).
"""
