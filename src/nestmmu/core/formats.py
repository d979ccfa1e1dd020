"""Power ISA v3.0 radix formats: PTE/PDE, PATE, PTCR, tlbie operands, DSISR bits, H_* codes.

Bit numbers in comments are IBM numbering (bit 0 = MSB of the doubleword); the constants are the
64-bit masks. Names follow Linux (``arch/powerpc/include/asm/book3s/64/radix.h``, ``reg.h``,
``hvcall.h``) so a KVM developer recognises them.  Entries are stored big-endian in simulated
memory by :mod:`nestmmu.core.memory`; this module only does arithmetic on the 64-bit values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

# --- Radix PTE / PDE (8 bytes) -------------------------------------------------------------
PTE_V = 0x8000_0000_0000_0000  # bit 0: valid (_PAGE_PRESENT)
PTE_L = 0x4000_0000_0000_0000  # bit 1: leaf (_PAGE_PTE); 0 = PDE
PTE_SW0 = 0x2000_0000_0000_0000  # bit 2: software
PTE_RPN_MASK = 0x01FF_FFFF_FFFF_F000  # bits 7:51, real page number (RA < 2^57; Linux < 2^53)
PDE_NLB_MASK = 0x0FFF_FFFF_FFFF_FF00  # bits 4:55, next level base
PDE_NLS_MASK = 0x1F  # bits 59:63, next level size = log2(entries)
PTE_SW_MASK = 0xE00  # bits 52:54
PTE_R = 0x100  # bit 55: reference (_PAGE_ACCESSED)
PTE_C = 0x080  # bit 56: change (_PAGE_DIRTY)
PTE_ATT_MASK = 0x030  # bits 58:59
ATT_NORMAL = 0x000
ATT_SAO = 0x010
ATT_NON_IDEMPOTENT = 0x020  # guarded I/O
ATT_TOLERANT = 0x030  # cache-inhibited
PTE_EAA_PRIV = 0x008  # bit 60 (_PAGE_PRIVILEGED; process scope only)
PTE_EAA_READ = 0x004  # bit 61 (_PAGE_READ)
PTE_EAA_RW = 0x002  # bit 62 (_PAGE_WRITE): read/write, implies read
PTE_EAA_EXEC = 0x001  # bit 63 (_PAGE_EXEC)
PTE_PERM_MASK = PTE_EAA_READ | PTE_EAA_RW | PTE_EAA_EXEC
PTE_RC_MASK = PTE_R | PTE_C

# --- Partition table / PTCR ----------------------------------------------------------------
PTCR_PATB_MASK = 0x0FFF_FFFF_FFFF_F000  # bits 4:51
PTCR_PATS_MASK = 0x1F  # bits 59:63; table is 2^(12+PATS) bytes, 2^(PATS+8) 16-byte entries
PATE_HR = 0x8000_0000_0000_0000  # dw0 bit 0: host radix
PATE_GR = 0x8000_0000_0000_0000  # dw1 bit 0: guest radix (must match HR)
RTS1_SHIFT = 61  # dw0 bits 1:2
RTS1_MASK = 0x3 << RTS1_SHIFT
RTS2_SHIFT = 5  # dw0 bits 56:58
RTS2_MASK = 0x7 << RTS2_SHIFT
RPDB_MASK = 0x0FFF_FFFF_FFFF_FF00  # dw0 bits 4:55
RPDS_MASK = 0x1F  # dw0 bits 59:63, log2(root entries)
PRTB_MASK = 0x0FFF_FFFF_FFFF_F000  # dw1 bits 4:51
PRTS_MASK = 0x1F
RTS_52BIT = 21  # address space = 2^(RTS+31); radix__get_tree_size() for 52 bits
PATE_SIZE = 16

# --- tlbie operands (H_TLB_INVALIDATE r4/r5/r6) --------------------------------------------
RIC_TLB = 0
RIC_PWC = 1
RIC_ALL = 2
IS_VA = 0
IS_PID = 1
IS_LPID = 2
IS_ALL = 3

# AP field (RB bits 56:58) → page shift; H_RPT_INVALIDATE page-size mask bits.
AP_TO_SHIFT = {0b000: 12, 0b101: 16, 0b001: 21, 0b010: 30}
SHIFT_TO_AP = {v: k for k, v in AP_TO_SHIFT.items()}
H_RPTI_PAGE_4K = 0x01
H_RPTI_PAGE_64K = 0x02
H_RPTI_PAGE_2M = 0x04
H_RPTI_PAGE_1G = 0x08
H_RPTI_PAGE_ALL = 0xFFFF_FFFF_FFFF_FFFF  # -1
RPTI_PAGE_BIT_TO_SHIFT = ((H_RPTI_PAGE_4K, 12), (H_RPTI_PAGE_64K, 16), (H_RPTI_PAGE_2M, 21), (H_RPTI_PAGE_1G, 30))
H_RPTI_TYPE_NESTED = 0x1
H_RPTI_TYPE_TLB = 0x2
H_RPTI_TYPE_PWC = 0x4
H_RPTI_TYPE_PAT = 0x8  # also PRT for process scope
H_RPTI_TYPE_NESTED_ALL = H_RPTI_TYPE_TLB | H_RPTI_TYPE_PWC | H_RPTI_TYPE_PAT
H_RPTI_TYPE_PRT = H_RPTI_TYPE_PAT  # process scope: the cached process-table entry
H_RPTI_TYPE_ALL = H_RPTI_TYPE_TLB | H_RPTI_TYPE_PWC | H_RPTI_TYPE_PRT
H_RPTI_TARGET_CMMU = 0x1
H_RPTI_TARGET_CMMU_LOCAL = 0x2
H_RPTI_TARGET_NMMU = 0x4
TLB_RANGE_FLUSH_PAGE_CEILING = 33  # tlb_range_flush_page_ceiling
U64 = 0xFFFF_FFFF_FFFF_FFFF

# --- DSISR / SRR1 bits (reg.h) -------------------------------------------------------------
DSISR_NOHPTE = 0x4000_0000
DSISR_NOEXEC_OR_G = 0x1000_0000
DSISR_PROTFAULT = 0x0800_0000
DSISR_ISSTORE = 0x0200_0000
DSISR_UNSUPP_MMU = 0x0008_0000
DSISR_SET_RC = 0x0004_0000
DSISR_PRTABLE_FAULT = 0x0002_0000
DSISR_BADACCESS = 0x0000_4000
DSISR_BAD_COPYPASTE = 0x0000_0008
DSISR_BAD_FAULT_64S = 0xA41A_400E
SRR1_ISI_N_G_OR_CIP = 0x1000_0000
DSISR_SRR1_MATCH_64S = 0x582E_0000
SRR1_MSR_BITS = ~0x783F_0000 & U64
# HDSISR bits meaning "hardware found a shadow PTE but refused it" (step 4 of the fault).
DSISR_HW_HAD_PTE = DSISR_PROTFAULT | DSISR_BADACCESS | DSISR_NOEXEC_OR_G | DSISR_BAD_COPYPASTE

DSISR_NAMES = {
    DSISR_NOHPTE: "NOHPTE",
    DSISR_NOEXEC_OR_G: "NOEXEC_OR_G",
    DSISR_PROTFAULT: "PROTFAULT",
    DSISR_ISSTORE: "ISSTORE",
    DSISR_UNSUPP_MMU: "UNSUPP_MMU",
    DSISR_SET_RC: "SET_RC",
    DSISR_PRTABLE_FAULT: "PRTABLE_FAULT",
    DSISR_BADACCESS: "BADACCESS",
    DSISR_BAD_COPYPASTE: "BAD_COPYPASTE",
}


def dsisr_names(dsisr: int) -> list[str]:
    """Names of the DSISR bits set, for reports and logs."""
    return [name for bit, name in DSISR_NAMES.items() if dsisr & bit]


# --- Interrupt vectors (trap numbers) ------------------------------------------------------
BOOK3S_INTERRUPT_DATA_STORAGE = 0x300
BOOK3S_INTERRUPT_INST_STORAGE = 0x400
BOOK3S_INTERRUPT_HV_DECREMENTER = 0x980
BOOK3S_INTERRUPT_SYSCALL = 0xC00  # sc: an hcall (sc 1) when the guest is not in HV mode
BOOK3S_INTERRUPT_H_DATA_STORAGE = 0xE00
BOOK3S_INTERRUPT_H_INST_STORAGE = 0xE20

# --- Hypercalls ----------------------------------------------------------------------------
H_SET_PARTITION_TABLE = 0xF800
H_ENTER_NESTED = 0xF804
H_TLB_INVALIDATE = 0xF808
H_COPY_TOFROM_GUEST = 0xF80C
H_RPT_INVALIDATE = 0x448
H_PUT_TERM_CHAR = 0x58  # console output: an L2 hcall that L1's userspace (QEMU) handles


class H(IntEnum):
    """Hypercall return codes (hvcall.h)."""

    SUCCESS = 0
    NOT_AVAILABLE = 3
    TOO_HARD = 9999
    FUNCTION = -2
    PARAMETER = -4
    BAD_MODE = -5
    NOT_FOUND = -7
    NO_MEM = -9
    AUTHORITY = -10
    P2 = -55
    P3 = -56
    P4 = -57
    P5 = -58
    UNSUPPORTED = -67
    INTERRUPT = -69


class Access(IntEnum):
    """The kind of an L2 access (HDSI load/store, or HISI instruction fetch)."""

    LOAD = 1
    STORE = 2
    IFETCH = 3


# --- Limits --------------------------------------------------------------------------------
MMU_LPID_BITS = 12  # POWER9 LPIDR width
KVM_MAX_NESTED_GUESTS_SHIFT = 12
KVMPPC_NR_LPIDS = 1 << MMU_LPID_BITS
NR_CPUS = 2048
RMAP_NESTED_LPID_MASK = 0xFFF0_0000_0000_0000
RMAP_NESTED_LPID_SHIFT = 52
RMAP_NESTED_GPA_MASK = 0x000F_FFFF_FFFF_F000
RMAP_NESTED_IS_SINGLE_ENTRY = 0x1


# --- Encoders / decoders -------------------------------------------------------------------
def make_pte(ra: int, perms: int, r: bool = False, c: bool = False, att: int = ATT_NORMAL) -> int:
    """A valid leaf PTE mapping real address ``ra`` (page aligned) with EAA ``perms``."""
    if ra & ~PTE_RPN_MASK:
        raise ValueError(f"real address {ra:#x} does not fit the RPN field or is not 4K aligned")
    if perms & ~(PTE_PERM_MASK | PTE_EAA_PRIV):
        raise ValueError(f"permission bits {perms:#x} are not EAA bits")
    return PTE_V | PTE_L | ra | (PTE_R if r else 0) | (PTE_C if c else 0) | (att & PTE_ATT_MASK) | perms


def make_pde(nlb: int, nls: int) -> int:
    """A valid PDE pointing at a next-level table of 2^nls entries based at ``nlb``."""
    if nlb & ~PDE_NLB_MASK:
        raise ValueError(f"next-level base {nlb:#x} does not fit NLB")
    if not 0 <= nls <= 31:
        raise ValueError(f"NLS {nls} out of range 0..31")
    return PTE_V | nlb | nls


def pte_is_valid(pte: int) -> bool:
    return bool(pte & PTE_V)


def pte_is_leaf(pte: int) -> bool:
    return bool(pte & PTE_L)


def pte_rpn(pte: int) -> int:
    return pte & PTE_RPN_MASK


def pde_nlb(pde: int) -> int:
    return pde & PDE_NLB_MASK


def pde_nls(pde: int) -> int:
    return pde & PDE_NLS_MASK


def pte_can_read(pte: int) -> bool:
    return bool(pte & (PTE_EAA_READ | PTE_EAA_RW))


def pte_can_write(pte: int) -> bool:
    return bool(pte & PTE_EAA_RW)


def pte_can_exec(pte: int) -> bool:
    return bool(pte & PTE_EAA_EXEC)


@dataclass(frozen=True, slots=True)
class PteFields:
    """Decoded view of a radix leaf PTE, for tests, dumps and reports."""

    valid: bool
    leaf: bool
    rpn: int
    r: bool
    c: bool
    att: int
    priv: bool
    read: bool
    rw: bool
    execute: bool

    @classmethod
    def decode(cls, pte: int) -> PteFields:
        return cls(
            valid=bool(pte & PTE_V),
            leaf=bool(pte & PTE_L),
            rpn=pte & PTE_RPN_MASK,
            r=bool(pte & PTE_R),
            c=bool(pte & PTE_C),
            att=pte & PTE_ATT_MASK,
            priv=bool(pte & PTE_EAA_PRIV),
            read=bool(pte & PTE_EAA_READ),
            rw=bool(pte & PTE_EAA_RW),
            execute=bool(pte & PTE_EAA_EXEC),
        )


def make_rts_field(rts: int) -> int:
    """RTS split into RTS1 (dw0 bits 1:2) and RTS2 (bits 56:58)."""
    return (((rts >> 3) & 0x3) << RTS1_SHIFT) | ((rts & 0x7) << RTS2_SHIFT)


def pate_rts(dw0: int) -> int:
    return (((dw0 & RTS1_MASK) >> RTS1_SHIFT) << 3) | ((dw0 & RTS2_MASK) >> RTS2_SHIFT)


def make_pate_dw0(root: int, rpds: int = 13, rts: int = RTS_52BIT, hr: bool = True) -> int:
    """PATE doubleword 0 for a radix tree rooted at ``root`` with 2^rpds root entries."""
    if root & ~RPDB_MASK:
        raise ValueError(f"root {root:#x} does not fit RPDB")
    return (PATE_HR if hr else 0) | make_rts_field(rts) | root | (rpds & RPDS_MASK)


def pate_root(dw0: int) -> int:
    return dw0 & RPDB_MASK


def pate_rpds(dw0: int) -> int:
    return dw0 & RPDS_MASK


def make_pate_dw1(prtb: int = 0, prts: int = 0, gr: bool = True) -> int:
    return (PATE_GR if gr else 0) | (prtb & PRTB_MASK) | (prts & PRTS_MASK)


def pate_prtb(dw1: int) -> int:
    """Process-table base from PATE dw1 (for LPID != 0 a guest real address)."""
    return dw1 & PRTB_MASK


def pate_prts(dw1: int) -> int:
    """Process-table size field: the table is 2^(12+PRTS) bytes, 2^(PRTS+8) entries."""
    return dw1 & PRTS_MASK


def make_prte_dw0(root: int, rpds: int = 13, rts: int = RTS_52BIT) -> int:
    """Process-table entry dw0 (same RTS/RPDB/RPDS layout as PATE dw0, no HR bit), as Linux
    builds it for each mm (``rts_field | __pa(pgd) | RADIX_PGD_INDEX_SIZE``)."""
    return make_pate_dw0(root, rpds, rts, hr=False)


PRTE_SIZE = 16  # process-table entry: dw0 (radix tree), dw1 (unused for radix)
# EA layout: bits 0:1 quadrant, bits 2:11 must be zero (else segment interrupt), 12:63 the
# 52-bit address the radix tree translates.
EA_QUADRANT_SHIFT = 62
EA_VALID_MASK = (1 << 52) - 1
EA_RESERVED_MASK = U64 & ~EA_VALID_MASK & ~(3 << EA_QUADRANT_SHIFT)


def make_ptcr(patb: int, pats: int) -> int:
    if patb & ~PTCR_PATB_MASK:
        raise ValueError(f"partition table base {patb:#x} does not fit PATB (4K aligned, < 2^60)")
    if not 0 <= pats <= 31:
        raise ValueError(f"PATS {pats} out of range 0..31")
    return patb | pats


def ptcr_patb(ptcr: int) -> int:
    return ptcr & PTCR_PATB_MASK


def ptcr_pats(ptcr: int) -> int:
    return ptcr & PTCR_PATS_MASK


@dataclass(frozen=True, slots=True)
class TlbieInstr:
    """Fields of a tlbie instruction image and its RS/RB operands (H_TLB_INVALIDATE)."""

    ric: int
    prs: int
    r: int
    lpid: int
    pid: int
    epn: int  # page address (RB & ~0xFFF)
    is_: int
    ap: int

    @classmethod
    def decode(cls, instr: int, rs: int, rb: int) -> TlbieInstr:
        return cls(
            ric=(instr >> 18) & 3,
            prs=(instr >> 17) & 1,
            r=(instr >> 16) & 1,
            lpid=rs & 0xFFFF_FFFF,
            pid=(rs >> 32) & 0xFFFF_FFFF,
            epn=rb & ~0xFFF & U64,
            is_=(rb >> 10) & 3,
            ap=(rb >> 5) & 7,
        )


def encode_tlbie(ric: int, prs: int, r: int, lpid: int, is_: int, epn: int = 0, ap: int = 0, pid: int = 0) -> tuple[int, int, int]:
    """(instr, rs, rb) for H_TLB_INVALIDATE, as Linux-as-L1 builds them."""
    instr = (ric << 18) | (prs << 17) | (r << 16)
    rs = (pid << 32) | (lpid & 0xFFFF_FFFF)
    rb = (epn & ~0xFFF & U64) | (is_ << 10) | (ap << 5)
    return instr, rs, rb


def nested_fault_n_gpa(asdr: int, hdar: int, dsisr: int) -> int:
    """The L2 real address of an HDSI (step 2 of __kvmhv_nested_page_fault): ASDR holds the
    page (bits 0:3 and the in-page offset are not part of it), HDAR the byte offset, except
    for a PRTABLE_FAULT, where ASDR already names the table entry."""
    n_gpa = asdr & ~0xF000_0000_0000_0FFF & U64
    if not dsisr & DSISR_PRTABLE_FAULT:
        n_gpa |= hdar & 0xFFF
    return n_gpa


def rmap_entry(l1_lpid: int, n_gpa: int) -> int:
    """Nested rmap entry: n_gpa bits with the L1-visible lpid in the top 12 bits."""
    return (n_gpa & RMAP_NESTED_GPA_MASK) | ((l1_lpid << RMAP_NESTED_LPID_SHIFT) & RMAP_NESTED_LPID_MASK)


def rmap_entry_lpid(entry: int) -> int:
    return (entry & RMAP_NESTED_LPID_MASK) >> RMAP_NESTED_LPID_SHIFT


def rmap_entry_gpa(entry: int) -> int:
    return entry & RMAP_NESTED_GPA_MASK
