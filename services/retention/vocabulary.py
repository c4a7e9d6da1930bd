"""The Retention API's enums and the words the database stores for them: each word
is its value's name without the enum's prefix, in lower case ("GRIEVANCE_STATE_IN_
PROGRESS" is 'in_progress'), read both ways, with the refusal of a value the API
does not know. The schema's CHECKs name the same words (tests/test_retention_queries.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.checkins import inbox
from services.domain.retention import periods
from services.domain.retention.expiry_run import ON_DEMAND, SCHEDULED
from services.kernel import audit, errors

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

V = TypeVar("V", bound=int)


class EnumMap(Generic[V]):
    """A proto enum's values (UNSPECIFIED excluded) and the database's word for each."""

    def __init__(self, enum: _EnumTypeWrapper[V]) -> None:
        self.enum = enum.DESCRIPTOR.name
        prefix = enum.Name(0).removesuffix("UNSPECIFIED")  # type: ignore[arg-type]
        self._numbers: dict[str, V] = {
            name.removeprefix(prefix).lower(): number for name, number in enum.items() if number
        }
        self._words: dict[int, str] = {number: word for word, number in self._numbers.items()}

    def items(self) -> list[tuple[V, str]]:
        """(value, word) in the enum's order."""
        return [(number, word) for word, number in self._numbers.items()]

    def words(self) -> list[str]:
        return list(self._numbers)

    def word(self, number: int, field: str) -> str:
        """The word of a required value; INVALID_ARGUMENT naming `field` otherwise."""
        found = self._words.get(number)
        if found is None:
            raise errors.InvalidArgument(f"{field} must be a known {self.enum}", field=field)
        return found

    def filter(self, number: int, field: str) -> str | None:
        """The word of an optional filter: None when unset (0), INVALID_ARGUMENT when
        it is no value of the enum."""
        if not number:
            return None
        found = self._words.get(number)
        if found is None:
            raise errors.InvalidArgument(f"{field} is not a known {self.enum}", field=field)
        return found

    def number(self, word: str) -> V:
        """The value of a stored word (the schema's CHECK allows no other)."""
        return self._numbers[word]

    def number_or(self, word: str | None, default: V) -> V:
        """The value of a word that may be missing (NULL), else `default`."""
        return self._numbers.get(word or "", default)


# -- retention ---------------------------------------------------------------------

DATA_CLASSES = EnumMap(pb.DataClass)
assert set(DATA_CLASSES.words()) == set(periods.CLASSES), "DataClass and CLASSES disagree"
TRIGGERS = EnumMap(pb.ExpiryTrigger)
assert set(TRIGGERS.words()) == {SCHEDULED, ON_DEMAND}

# -- grievances --------------------------------------------------------------------

CATEGORIES = EnumMap(pb.GrievanceCategory)
BODIES = EnumMap(pb.GrievanceBody)
STATES = EnumMap(pb.GrievanceState)
OUTCOMES = EnumMap(pb.GrievanceOutcome)
DENIED_ENTRY, IN_PROGRESS, RESOLVED = "denied_entry", "in_progress", "resolved"

# Routing, as the proto documents it per category.
ROUTES = {
    "misuse_of_data": "committee",
    "privacy": "regulator",
    "denied_entry": "committee",
    "wrong_data": "mptc",
    "other": "mptc",
}
assert set(ROUTES) == set(CATEGORIES.words()) and set(ROUTES.values()) == set(BODIES.words())

# -- check-ins and the audit log ---------------------------------------------------

DIRECTIONS = EnumMap(common_pb2.ScanDirection)
assert set(DIRECTIONS.words()) == set(inbox.DIRECTIONS)
AUDIT_OUTCOMES = EnumMap(pb.AuditOutcome)
assert set(AUDIT_OUTCOMES.words()) == set(audit.OUTCOMES)
