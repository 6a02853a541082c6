"""The other sides of a comparison (`refprism.compare`): other implementations captured in refprism's names."""
