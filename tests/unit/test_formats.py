"""ISA formats (semantics §1, §2, §7): masks at their IBM bit positions, encoders, constants."""

from __future__ import annotations

import pytest

from nestmmu.core import formats as f
from nestmmu.core.formats import H


def ibm(first: int, last: int | None = None) -> int:
    """The 64-bit mask of IBM bits first..last (bit 0 = MSB), computed independently."""
    last = first if last is None else last
    return sum(1 << (63 - b) for b in range(first, last + 1))


# --------------------------------------------------------------------------- §1.1 PTE / PDE
@pytest.mark.parametrize(
    ("name", "value", "first", "last"),
    [
        ("PTE_V", f.PTE_V, 0, 0),
        ("PTE_L", f.PTE_L, 1, 1),
        ("PTE_SW0", f.PTE_SW0, 2, 2),
        ("PTE_RPN_MASK", f.PTE_RPN_MASK, 7, 51),
        ("PDE_NLB_MASK", f.PDE_NLB_MASK, 4, 55),
        ("PDE_NLS_MASK", f.PDE_NLS_MASK, 59, 63),
        ("PTE_SW_MASK", f.PTE_SW_MASK, 52, 54),
        ("PTE_R", f.PTE_R, 55, 55),
        ("PTE_C", f.PTE_C, 56, 56),
        ("PTE_ATT_MASK", f.PTE_ATT_MASK, 58, 59),
        ("PTE_EAA_PRIV", f.PTE_EAA_PRIV, 60, 60),
        ("PTE_EAA_READ", f.PTE_EAA_READ, 61, 61),
        ("PTE_EAA_RW", f.PTE_EAA_RW, 62, 62),
        ("PTE_EAA_EXEC", f.PTE_EAA_EXEC, 63, 63),
    ],
)
def test_pte_field_at_its_ibm_bits(name: str, value: int, first: int, last: int) -> None:
    assert value == ibm(first, last), name


def test_pte_masks_match_the_documented_hex() -> None:
    assert f.PTE_V == 0x8000000000000000
    assert f.PTE_L == 0x4000000000000000
    assert f.PTE_RPN_MASK == 0x01FFFFFFFFFFF000
    assert f.PDE_NLB_MASK == 0x0FFFFFFFFFFFFF00
    assert f.PDE_NLS_MASK == 0x1F
    assert (f.PTE_R, f.PTE_C) == (0x100, 0x080)
    assert (f.PTE_EAA_PRIV, f.PTE_EAA_READ, f.PTE_EAA_RW, f.PTE_EAA_EXEC) == (0x8, 0x4, 0x2, 0x1)


def test_att_values() -> None:
    assert f.ATT_NORMAL == 0x00
    assert f.ATT_SAO == 0x10
    assert f.ATT_NON_IDEMPOTENT == 0x20
    assert f.ATT_TOLERANT == 0x30
    for att in (f.ATT_NORMAL, f.ATT_SAO, f.ATT_NON_IDEMPOTENT, f.ATT_TOLERANT):
        assert att & ~f.PTE_ATT_MASK == 0


def test_leaf_fields_do_not_overlap() -> None:
    fields = [
        f.PTE_V,
        f.PTE_L,
        f.PTE_SW0,
        f.PTE_RPN_MASK,
        f.PTE_SW_MASK,
        f.PTE_R,
        f.PTE_C,
        f.PTE_ATT_MASK,
        f.PTE_EAA_PRIV,
        f.PTE_EAA_READ,
        f.PTE_EAA_RW,
        f.PTE_EAA_EXEC,
    ]
    seen = 0
    for m in fields:
        assert seen & m == 0
        seen |= m


def test_make_pte_encodes_every_field() -> None:
    ra = 0x0123_4567_8000
    pte = f.make_pte(ra, f.PTE_EAA_READ | f.PTE_EAA_EXEC, r=True, c=True, att=f.ATT_TOLERANT)
    assert pte == f.PTE_V | f.PTE_L | ra | f.PTE_R | f.PTE_C | 0x30 | 0x4 | 0x1
    d = f.PteFields.decode(pte)
    assert d == f.PteFields(valid=True, leaf=True, rpn=ra, r=True, c=True, att=0x30, priv=False, read=True, rw=False, execute=True)
    assert f.pte_is_valid(pte) and f.pte_is_leaf(pte)
    assert f.pte_rpn(pte) == ra
    assert f.pte_can_read(pte) and not f.pte_can_write(pte) and f.pte_can_exec(pte)


def test_make_pte_without_rc_leaves_them_clear() -> None:
    pte = f.make_pte(0x1000, f.PTE_EAA_RW)
    assert pte & (f.PTE_R | f.PTE_C) == 0
    assert pte & f.PTE_ATT_MASK == f.ATT_NORMAL


def test_write_implies_read() -> None:
    assert f.pte_can_read(f.make_pte(0, f.PTE_EAA_RW))
    assert not f.pte_can_read(f.make_pte(0, f.PTE_EAA_EXEC))


def test_make_pte_accepts_priv_bit() -> None:
    assert f.make_pte(0x2000, f.PTE_EAA_PRIV | f.PTE_EAA_READ) & f.PTE_EAA_PRIV


@pytest.mark.parametrize("ra", [0x1001, 0x800, 1 << 57, 1 << 60])
def test_make_pte_rejects_bad_real_address(ra: int) -> None:
    with pytest.raises(ValueError, match="real address"):
        f.make_pte(ra, f.PTE_EAA_READ)


@pytest.mark.parametrize("perms", [0x10, 0x100, 0x80, 0x40])
def test_make_pte_rejects_non_eaa_permission_bits(perms: int) -> None:
    with pytest.raises(ValueError, match="permission"):
        f.make_pte(0x1000, perms)


def test_make_pde_encodes_nlb_and_nls() -> None:
    pde = f.make_pde(0x0012_3400, 9)
    assert pde == f.PTE_V | 0x0012_3400 | 9
    assert not f.pte_is_leaf(pde)
    assert f.pde_nlb(pde) == 0x0012_3400
    assert f.pde_nls(pde) == 9


@pytest.mark.parametrize("nlb", [0x80, 0x1, 1 << 60])
def test_make_pde_rejects_nlb_outside_field(nlb: int) -> None:
    with pytest.raises(ValueError, match="NLB"):
        f.make_pde(nlb, 9)


@pytest.mark.parametrize("nls", [-1, 32])
def test_make_pde_rejects_nls_out_of_range(nls: int) -> None:
    with pytest.raises(ValueError, match="NLS"):
        f.make_pde(0x1000, nls)


# --------------------------------------------------------------------------- §1.2 PATE / PTCR
def test_pate_dw0_masks_at_ibm_bits() -> None:
    assert ibm(0) == f.PATE_HR
    assert ibm(1, 2) == f.RTS1_MASK
    assert ibm(4, 55) == f.RPDB_MASK
    assert ibm(56, 58) == f.RTS2_MASK
    assert ibm(59, 63) == f.RPDS_MASK


def test_rts_for_52_bits_is_the_linux_tree_size() -> None:
    # radix__get_tree_size(): 0x4000000000000000 | 0xA0 for RTS=21.
    assert f.RTS_52BIT == 21
    assert f.make_rts_field(21) == 0x4000_0000_0000_00A0
    assert f.make_pate_dw0(0, rpds=0, hr=False) == 0x4000_0000_0000_00A0
    assert f.make_pate_dw0(0, rpds=0) == 0xC000_0000_0000_00A0


@pytest.mark.parametrize("rts", range(32))
def test_rts_split_round_trips(rts: int) -> None:
    dw0 = f.make_pate_dw0(0x10000, rts=rts)
    assert f.pate_rts(dw0) == rts
    assert f.pate_root(dw0) == 0x10000


def test_pate_dw0_root_and_rpds() -> None:
    dw0 = f.make_pate_dw0(0x0ABC_DE00, rpds=13)
    assert f.pate_root(dw0) == 0x0ABC_DE00
    assert f.pate_rpds(dw0) == 13
    assert dw0 & f.PATE_HR


def test_pate_dw0_rejects_root_outside_rpdb() -> None:
    with pytest.raises(ValueError, match="RPDB"):
        f.make_pate_dw0(0x10)


def test_pate_dw1() -> None:
    assert ibm(0) == f.PATE_GR
    assert ibm(4, 51) == f.PRTB_MASK
    assert ibm(59, 63) == f.PRTS_MASK
    assert f.make_pate_dw1() == f.PATE_GR
    assert f.make_pate_dw1(0x0055_6000, 3) == f.PATE_GR | 0x0055_6000 | 3
    assert f.make_pate_dw1(0x1000, 0, gr=False) == 0x1000
    # Bits outside the fields are dropped.
    assert f.make_pate_dw1(0x1FFF, 0x25, gr=False) == 0x1000 | 0x5


def test_ptcr_fields() -> None:
    assert ibm(4, 51) == f.PTCR_PATB_MASK
    assert ibm(59, 63) == f.PTCR_PATS_MASK
    ptcr = f.make_ptcr(0x0123_4000, 4)
    assert ptcr == 0x0123_4004
    assert f.ptcr_patb(ptcr) == 0x0123_4000
    assert f.ptcr_pats(ptcr) == 4


@pytest.mark.parametrize("patb", [0x800, 1 << 60])
def test_make_ptcr_rejects_patb(patb: int) -> None:
    with pytest.raises(ValueError, match="PATB"):
        f.make_ptcr(patb, 0)


@pytest.mark.parametrize("pats", [-1, 32])
def test_make_ptcr_rejects_pats(pats: int) -> None:
    with pytest.raises(ValueError, match="PATS"):
        f.make_ptcr(0x1000, pats)


def test_pate_size_is_16_bytes() -> None:
    assert f.PATE_SIZE == 16


# --------------------------------------------------------------------------- §1.4 tlbie / AP
def test_ap_shift_table() -> None:
    assert f.AP_TO_SHIFT == {0b000: 12, 0b101: 16, 0b001: 21, 0b010: 30}
    for ap, shift in f.AP_TO_SHIFT.items():
        assert f.SHIFT_TO_AP[shift] == ap
    assert len(f.SHIFT_TO_AP) == 4


def test_rpt_page_bits() -> None:
    assert (f.H_RPTI_PAGE_4K, f.H_RPTI_PAGE_64K, f.H_RPTI_PAGE_2M, f.H_RPTI_PAGE_1G) == (1, 2, 4, 8)
    assert f.RPTI_PAGE_BIT_TO_SHIFT == ((1, 12), (2, 16), (4, 21), (8, 30))
    assert f.H_RPTI_PAGE_ALL == (1 << 64) - 1


def test_rpt_type_and_target_bits() -> None:
    assert (f.H_RPTI_TYPE_NESTED, f.H_RPTI_TYPE_TLB, f.H_RPTI_TYPE_PWC, f.H_RPTI_TYPE_PAT) == (1, 2, 4, 8)
    assert f.H_RPTI_TYPE_NESTED_ALL == 0xE
    assert (f.H_RPTI_TARGET_CMMU, f.H_RPTI_TARGET_CMMU_LOCAL, f.H_RPTI_TARGET_NMMU) == (1, 2, 4)
    assert f.TLB_RANGE_FLUSH_PAGE_CEILING == 33


def test_tlbie_field_positions() -> None:
    instr, rs, rb = f.encode_tlbie(ric=2, prs=1, r=1, lpid=0x7, is_=2, epn=0x12345000, ap=0b101, pid=0x9)
    assert instr == (2 << 18) | (1 << 17) | (1 << 16)
    assert rs == (0x9 << 32) | 0x7
    assert rb == 0x12345000 | (2 << 10) | (0b101 << 5)


def test_tlbie_decode_known_image() -> None:
    t = f.TlbieInstr.decode(0x000D_0000, 0x0000_0003_0000_0042, 0x0000_0000_0040_0C20)
    # instr 0xD0000: RIC=3, PRS=0, R=1.
    assert (t.ric, t.prs, t.r) == (3, 0, 1)
    assert (t.lpid, t.pid) == (0x42, 3)
    assert t.epn == 0x400000
    assert t.is_ == 3
    assert t.ap == 1


@pytest.mark.parametrize(
    ("ric", "prs", "r", "lpid", "pid", "epn", "is_", "ap"),
    [
        (0, 0, 1, 1, 0, 0x10000, 0, 0b101),
        (1, 0, 1, 4095, 0, 0, 2, 0),
        (2, 1, 0, 0xFFFF_FFFF, 0xFFFF_FFFF, 0x000F_FFFF_FFFF_F000, 3, 7),
        (3, 1, 1, 0, 17, 0x4000_0000, 1, 0b010),
    ],
)
def test_tlbie_encode_decode_round_trip(ric: int, prs: int, r: int, lpid: int, pid: int, epn: int, is_: int, ap: int) -> None:
    t = f.TlbieInstr.decode(*f.encode_tlbie(ric, prs, r, lpid, is_, epn, ap, pid))
    assert t == f.TlbieInstr(ric=ric, prs=prs, r=r, lpid=lpid, pid=pid, epn=epn, is_=is_, ap=ap)


def test_tlbie_decode_drops_epn_low_bits() -> None:
    t = f.TlbieInstr.decode(0, 0, 0x12345FFF)
    assert t.epn == 0x12345000
    assert t.is_ == 3 and t.ap == 7


# --------------------------------------------------------------------------- §7 rmap
def test_rmap_masks() -> None:
    assert f.RMAP_NESTED_LPID_MASK == 0xFFF0_0000_0000_0000
    assert f.RMAP_NESTED_LPID_SHIFT == 52
    assert f.RMAP_NESTED_GPA_MASK == 0x000F_FFFF_FFFF_F000
    assert f.RMAP_NESTED_IS_SINGLE_ENTRY == 1


def test_rmap_entry_puts_lpid_in_top_12_bits() -> None:
    e = f.rmap_entry(0xABC, 0x0001_2345_6789_A000)
    assert e == (0xABC << 52) | 0x0001_2345_6789_A000
    assert f.rmap_entry_lpid(e) == 0xABC
    assert f.rmap_entry_gpa(e) == 0x0001_2345_6789_A000


def test_rmap_entry_masks_gpa() -> None:
    e = f.rmap_entry(1, 0xFFFF_FFFF_FFFF_FFFF)
    assert f.rmap_entry_gpa(e) == 0x000F_FFFF_FFFF_F000
    assert e & 0xFFF == 0
    assert f.rmap_entry_lpid(e) == 1


def test_rmap_entry_max_lpid_and_zero_entry() -> None:
    assert f.rmap_entry_lpid(f.rmap_entry(4095, 0)) == 4095
    # §9.14: lpid 0 with n_gpa 0 encodes as 0, the list terminator value.
    assert f.rmap_entry(0, 0) == 0
    assert f.rmap_entry(0, 0xFFF) == 0


# --------------------------------------------------------------------------- DSISR (reg.h)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f.DSISR_NOHPTE, 0x40000000),
        (f.DSISR_PROTFAULT, 0x08000000),
        (f.DSISR_ISSTORE, 0x02000000),
        (f.DSISR_SET_RC, 0x00040000),
        (f.DSISR_PRTABLE_FAULT, 0x00020000),
        (f.DSISR_UNSUPP_MMU, 0x00080000),
        (f.DSISR_BADACCESS, 0x00004000),
        (f.DSISR_NOEXEC_OR_G, 0x10000000),
        (f.DSISR_BAD_COPYPASTE, 0x00000008),
        (f.DSISR_BAD_FAULT_64S, 0xA41A400E),
        (f.SRR1_ISI_N_G_OR_CIP, 0x10000000),
        (f.DSISR_SRR1_MATCH_64S, 0x582E0000),
    ],
)
def test_dsisr_constants_match_linux(value: int, expected: int) -> None:
    assert value == expected


def test_srr1_msr_bits_and_hw_had_pte() -> None:
    assert f.SRR1_MSR_BITS == 0xFFFF_FFFF_87C0_FFFF
    assert f.DSISR_HW_HAD_PTE == 0x08000000 | 0x00004000 | 0x10000000 | 0x8


def test_dsisr_names() -> None:
    assert f.dsisr_names(f.DSISR_ISSTORE | f.DSISR_SET_RC) == ["ISSTORE", "SET_RC"]
    assert f.dsisr_names(0) == []


# --------------------------------------------------------------------------- §2 hcalls
def test_hcall_numbers() -> None:
    assert f.H_SET_PARTITION_TABLE == 0xF800
    assert f.H_ENTER_NESTED == 0xF804
    assert f.H_TLB_INVALIDATE == 0xF808
    assert f.H_COPY_TOFROM_GUEST == 0xF80C
    assert f.H_RPT_INVALIDATE == 0x448


def test_hcall_return_codes() -> None:
    assert {h.name: int(h) for h in H} == {
        "SUCCESS": 0,
        "NOT_AVAILABLE": 3,
        "TOO_HARD": 9999,
        "FUNCTION": -2,
        "PARAMETER": -4,
        "BAD_MODE": -5,
        "NOT_FOUND": -7,
        "NO_MEM": -9,
        "AUTHORITY": -10,
        "P2": -55,
        "P3": -56,
        "P4": -57,
        "P5": -58,
        "UNSUPPORTED": -67,
        "INTERRUPT": -69,
    }


def test_trap_numbers() -> None:
    assert f.BOOK3S_INTERRUPT_H_DATA_STORAGE == 0xE00
    assert f.BOOK3S_INTERRUPT_H_INST_STORAGE == 0xE20
    assert f.BOOK3S_INTERRUPT_HV_DECREMENTER == 0x980
    assert f.BOOK3S_INTERRUPT_DATA_STORAGE == 0x300
    assert f.BOOK3S_INTERRUPT_INST_STORAGE == 0x400


def test_limits() -> None:
    assert f.MMU_LPID_BITS == 12
    assert f.KVMPPC_NR_LPIDS == 4096
    assert f.KVM_MAX_NESTED_GUESTS_SHIFT == 12
