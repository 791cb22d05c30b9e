"""Pure pydicom: de-identify one dataset per DICOM PS3.15 Annex E, basic profile.

No Django here. The attribute table (Table E.1-1, "Basic Prof." column) is data: we
take it from the `dicom-anonymizer` package (Kitware; its `dicomfields_2026c` module
transcribes the current edition of the standard's table, one list per action), pinned
in requirements.txt, rather than transcribing ~600 rows by hand. We do not use that
package's engine: it keeps replaced UIDs in one process-wide dictionary of random UIDs,
so two exports would share (and leak between each other) one mapping, and it is not
safe to use from two threads. Here every export has its own `Deidentifier`: UIDs are
remapped by a keyed hash (HMAC-SHA-256 with a per-export secret) into the 2.25 root, so
the same original UID maps to the same new UID anywhere in one export (Study, Series,
SOP Instance, Frame of Reference and every Referenced ... UID inside sequences) and
exports cannot be linked to each other or back to the originals.

Compound actions of the table (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) let the implementer choose
by the attribute's type in the IOD; without per-IOD module tables we take the choice
that keeps a dataset valid in every IOD (see `_resolve`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

DEIDENTIFICATION_METHOD = "PS3.15 Annex E Basic Profile, UIDs remapped (Precedent)"
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
PSEUDONYM_PREFIX = "ANON-"

# Table E.1-1 actions: D replace with a dummy value, Z empty (or dummy), X remove,
# K keep, C clean (replace with values of similar meaning), U replace UIDs consistently.
Action = str
_ACTIONS = {"D", "Z", "X", "K", "C", "U"}


def _resolve(compound: str) -> Action:
    """Pick one action for the table's compound entries.

    Z/D → Z: an empty value is valid for Type 2 and 3; the few Type 1 ones (Content
    Date/Time in SR and SEG) are listed in `_DUMMY_WHERE_REQUIRED` and get D.
    X/Z, X/D, X/Z/D → Z: keeping the attribute present but empty is valid in every IOD
    (Type 2 and 3 may be empty), while removing a Type 2 attribute is not.
    X/Z/U* → U: Referenced/Source Image sequences stay, with their UIDs remapped, so a
    reference inside the export still resolves (the reason an export remaps at all).
    """
    return {"Z/D": "Z", "X/Z": "Z", "X/D": "Z", "X/Z/D": "Z", "X/Z/U*": "U"}.get(compound, compound)


_DUMMY_WHERE_REQUIRED = {Tag(0x0008, 0x0023), Tag(0x0008, 0x0033)}  # Content Date, Content Time


def _basic_profile_table() -> tuple[dict[BaseTag, Action], list[tuple[int, int, int, int, Action]]]:
    """Tag → action for exact tags, plus (group, element, group mask, element mask,
    action) for the repeating groups (curves 50xx, overlays 60xx)."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    categories = {
        "D_TAGS": "D",
        "Z_TAGS": "Z",
        "X_TAGS": "X",
        "U_TAGS": "U",
        "Z_D_TAGS": "Z/D",
        "X_Z_TAGS": "X/Z",
        "X_D_TAGS": "X/D",
        "X_Z_D_TAGS": "X/Z/D",
        "X_Z_U_STAR_TAGS": "X/Z/U*",
    }
    exact: dict[BaseTag, Action] = {}
    masked: list[tuple[int, int, int, int, Action]] = []
    for name, compound in categories.items():
        action = _resolve(compound)
        for entry in getattr(table, name):
            if len(entry) == 2:
                tag = Tag(*entry)
                exact[tag] = "D" if tag in _DUMMY_WHERE_REQUIRED else action
            else:
                masked.append((*entry, action))
    return exact, masked


BASIC_PROFILE, _MASKED = _basic_profile_table()


def action_for(tag: BaseTag) -> Action | None:
    """The basic profile's action for one attribute, None when the table does not list it
    (such attributes are kept, as the profile says)."""
    action = BASIC_PROFILE.get(tag)
    if action is not None:
        return action
    for group, element, group_mask, element_mask, masked_action in _MASKED:
        if tag.group & group_mask == group and tag.element & element_mask == element:
            return masked_action
    return None


def burned_in_annotation(ds: Dataset) -> str | None:
    """Why a dataset cannot be released by header de-identification alone, or None.

    The basic profile only covers the header; text burned into the pixels (Burned In
    Annotation YES) would survive it, so such instances are left out of an export."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "Burned In Annotation (0028,0301) is YES: identifying text may be in the pixels"
    return None


@dataclass
class Deidentifier:
    """One export's de-identification state: the secret that keys UID remapping and
    patient pseudonyms. Use one per export; never persist `key`."""

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    uid_map: dict[str, str] = field(default_factory=dict, repr=False)

    def uid(self, original: str) -> str:
        """The new UID for an original one: the same in this export, unlinkable across
        exports. 2.25.<decimal of 128 bits> is at most 44 characters (PS3.5 B.2)."""
        original = str(original).strip().rstrip("\x00")
        if not original:
            return original
        new = self.uid_map.get(original)
        if new is None:
            digest = hmac.new(self.key, b"uid:" + original.encode(), hashlib.sha256).digest()
            new = f"2.25.{int.from_bytes(digest[:16], 'big')}"
            self.uid_map[original] = new
        return new

    def pseudonym(self, patient_id: str) -> str:
        """A patient pseudonym (Patient ID and Name): one patient's studies stay grouped
        within the export, which is what research use needs, without the real ID."""
        digest = hmac.new(self.key, b"patient:" + patient_id.encode(), hashlib.sha256).hexdigest()
        return PSEUDONYM_PREFIX + digest[:12].upper()

    def deidentify(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place (and return it). Raises nothing for odd values: an
        element the table does not list is kept as is, as the profile says."""
        original_patient = str(ds.get("PatientID", "") or "") + "\\" + str(ds.get("PatientName", "") or "")
        _walk(ds, self)
        pseudonym = self.pseudonym(original_patient)
        ds.PatientID = pseudonym  # Z allows a dummy value: a pseudonym keeps patients grouped
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        # Dates are emptied (basic profile, no Retain Longitudinal option).
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                            "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID",
                            "PrivateInformation"):  # fmt: skip
                if keyword in meta:
                    del meta[keyword]
        return ds


def _walk(ds: Dataset, deid: Deidentifier) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            # The basic profile removes private attributes (no Retain Safe Private option).
            del ds[tag]
            continue
        element = ds[tag]  # converts a raw element
        action = action_for(tag)
        if action is None or action == "K":
            if element.VR == "SQ":
                _walk_items(element, deid)
            continue
        _APPLY[action](ds, element, deid)


def _walk_items(element: DataElement, deid: Deidentifier) -> None:
    for item in element.value or ():
        _walk(item, deid)


def _remove(ds: Dataset, element: DataElement, _deid: Deidentifier) -> None:
    del ds[element.tag]


def _empty(ds: Dataset, element: DataElement, _deid: Deidentifier) -> None:
    element.value = Sequence([]) if element.VR == "SQ" else None


def _replace_uids(ds: Dataset, element: DataElement, deid: Deidentifier) -> None:
    if element.VR == "SQ":
        _walk_items(element, deid)  # U* on a sequence: the UIDs inside are remapped
    elif element.VR == "UI":
        if element.is_empty:
            return
        values = element.value if element.VM > 1 else [element.value]
        new = [deid.uid(value) for value in values]
        element.value = new if element.VM > 1 else new[0]
    else:
        _dummy(ds, element, deid)


_TEXT_DUMMY = "ANONYMIZED"
_DUMMIES: dict[str, object] = {
    "PN": "ANONYMIZED",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "UR": "http://anonymized.invalid",
    "OB": b"\x00\x00",
    "UN": b"\x00\x00",
}


def _dummy(ds: Dataset, element: DataElement, deid: Deidentifier) -> None:
    vr = element.VR
    if vr == "SQ":
        _walk_items(element, deid)  # the items, themselves de-identified, are the dummy
    elif vr == "UI":
        _replace_uids(ds, element, deid)
    elif vr in _DUMMIES:
        element.value = _DUMMIES[vr]
    elif vr in {"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"}:
        element.value = _TEXT_DUMMY
    elif vr in {"FD", "FL", "SS", "US", "SL", "UL", "SV", "UV"}:
        element.value = 0
    else:
        del ds[element.tag]  # no meaningful dummy for other binary VRs: remove


_APPLY: dict[Action, Callable[[Dataset, DataElement, Deidentifier], None]] = {
    "X": _remove,
    "Z": _empty,
    "U": _replace_uids,
    "D": _dummy,
    "C": _dummy,  # Clean Descriptors is an option beyond the basic profile: dummy here
}
assert set(_APPLY) | {"K"} == _ACTIONS


def remapped_uids(ds: Dataset) -> Iterable[str]:
    """Every UI value of the basic profile's U attributes left in `ds` (for checks)."""
    for element in ds.iterall():
        if action_for(element.tag) == "U" and element.VR == "UI" and not element.is_empty:
            yield from (element.value if element.VM > 1 else [element.value])
