"""The other sides of `refprism compare`: other implementations' activations turned into a `refprism.capture.Capture`."""
