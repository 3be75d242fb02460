"""One module per pipeline step; each exposes a function returning the SageMaker SDK step.

The modules import the SageMaker SDK at import time; import them through
`pipeline.definition`, which prepares the region the SDK needs first.
"""
