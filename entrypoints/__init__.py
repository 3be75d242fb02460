"""The scripts the pipeline steps run, and the small modules they share.

This folder is uploaded alone as a SageMaker `source_dir`, where its modules import each other
flat (`import contract`). Being a package as well lets `steps/` import `entrypoints.contract`, the
stdlib-only module of names both sides must agree on.
"""
