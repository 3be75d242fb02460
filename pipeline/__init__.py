"""Kennel's pipeline: configuration, parameters, the definition, the targets and the CLI.

Nothing here imports the SageMaker SDK at import time; the modules that need it import it inside
the functions that use it.
"""
