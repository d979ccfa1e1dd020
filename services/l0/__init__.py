"""L0 service: the host hypervisor (KVM-HV) as a gRPC server (nestmmu.services.l0)."""
