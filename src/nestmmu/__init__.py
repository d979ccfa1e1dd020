"""nestmmu: an executable, distributed model of nested POWER9 radix MMUs as Linux KVM-HV runs them."""

__version__ = "0.1.0"
