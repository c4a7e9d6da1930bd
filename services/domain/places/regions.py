"""Cambodia's provinces: the only values a venue's `region_code` may take.

ISO 3166-2:KH names 24 provinces and the capital, Phnom Penh (an autonomous
municipality), KH-1 to KH-25; Tboung Khmum (KH-25) was split from Kampong Cham in
2013. The numbers are those of the government's own province codes (01-25 in the
General Directorate of Digital Economy's administrative-division lists), so the two
numberings agree. Khmer names follow that government list; English names are the
usual ones (ISO's romanisations, such as "Baat Dambang", are not what people write).

The table is data here, in one place: the Venue service validates against it, the
Retention service counts by it, and `tests/test_regions.py` pins it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.kernel import errors


@dataclass(frozen=True)
class Province:
    code: str
    """ISO 3166-2 code, for example "KH-12"."""
    name_en: str
    name_km: str


PROVINCES: tuple[Province, ...] = (
    Province("KH-1", "Banteay Meanchey", "បន្ទាយមានជ័យ"),
    Province("KH-2", "Battambang", "បាត់ដំបង"),
    Province("KH-3", "Kampong Cham", "កំពង់ចាម"),
    Province("KH-4", "Kampong Chhnang", "កំពង់ឆ្នាំង"),
    Province("KH-5", "Kampong Speu", "កំពង់ស្ពឺ"),
    Province("KH-6", "Kampong Thom", "កំពង់ធំ"),
    Province("KH-7", "Kampot", "កំពត"),
    Province("KH-8", "Kandal", "កណ្ដាល"),
    Province("KH-9", "Koh Kong", "កោះកុង"),
    Province("KH-10", "Kratie", "ក្រចេះ"),
    Province("KH-11", "Mondulkiri", "មណ្ឌលគិរី"),
    Province("KH-12", "Phnom Penh", "រាជធានីភ្នំពេញ"),
    Province("KH-13", "Preah Vihear", "ព្រះវិហារ"),
    Province("KH-14", "Prey Veng", "ព្រៃវែង"),
    Province("KH-15", "Pursat", "ពោធិ៍សាត់"),
    Province("KH-16", "Ratanakiri", "រតនគិរី"),
    Province("KH-17", "Siem Reap", "សៀមរាប"),
    Province("KH-18", "Preah Sihanouk", "ព្រះសីហនុ"),
    Province("KH-19", "Stung Treng", "ស្ទឹងត្រែង"),
    Province("KH-20", "Svay Rieng", "ស្វាយរៀង"),
    Province("KH-21", "Takeo", "តាកែវ"),
    Province("KH-22", "Oddar Meanchey", "ឧត្ដរមានជ័យ"),
    Province("KH-23", "Kep", "កែប"),
    Province("KH-24", "Pailin", "ប៉ៃលិន"),
    Province("KH-25", "Tboung Khmum", "ត្បូងឃ្មុំ"),
)

BY_CODE: dict[str, Province] = {p.code: p for p in PROVINCES}

UNKNOWN = ""
"""What figures by province call a venue whose stored code is no province: venues
registered before codes were checked (see the README, "Places")."""


def province(code: str, field: str) -> Province:
    """The province `code` names (surrounding blanks and letter case ignored);
    INVALID_ARGUMENT naming `field` otherwise."""
    found = BY_CODE.get(code.strip().upper())
    if found is None:
        raise errors.InvalidArgument(
            f"{field} must be a Cambodian province code, KH-1 to KH-25 (ISO 3166-2:KH), "
            "for example KH-12 for Phnom Penh",
            field=field,
        )
    return found


def of_stored(code: str) -> str:
    """The province a stored venue code counts under: itself, or UNKNOWN."""
    return code if code in BY_CODE else UNKNOWN
