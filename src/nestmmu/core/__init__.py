"""The pure core: radix formats and walks, the L0 and L1 hypervisors, vCPU TLBs.

Nothing in this package touches a socket, a thread, the wall clock or unseeded randomness.
"""
