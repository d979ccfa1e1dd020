"""gRPC adapters of the three privilege levels; installed as ``nestmmu.services``.

This directory is mapped to the ``nestmmu.services`` package by setup.py (package_dir), so
import it only as ``nestmmu.services.l0`` etc., never as a top-level ``services`` package.
Do not create src/nestmmu/services: it would shadow this directory in editable installs.
"""
