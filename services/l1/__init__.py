"""L1 service: the guest hypervisor as a gRPC server (nestmmu.services.l1)."""
