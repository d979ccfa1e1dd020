"""L2 service: nested-guest vCPUs and their TLBs as a gRPC server (nestmmu.services.l2)."""
