"""Denied-entry appeals: what a grievance against a refusal at the door keeps of it,
and what the officer is shown.

Filing an appeal finds the denial (in the store, or still in the inbox), opens its
person with the day key, and keeps a snapshot: when and where, and the risk level
and basis in force then (never the case). The person is kept only sealed under
the people key, to show the officer their level now; a person who withdrew
consent has left a row that belongs to nobody, and the snapshot then has no
person.
"""

from __future__ import annotations

import uuid

from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.exposure import risk
from services.kernel import errors, keys
from services.kernel.db import Conn
from services.kernel.keys import KeyStore, Sealed
from services.retention.queries import grievances as store
from services.retention.queries.grievances import DenialSnapshot, Grievance
from services.retention.spans import instant


def _no_denial(detail: str = "") -> errors.NotFound:
    return errors.NotFound(
        f"no denial with this decision id is held{detail}",
        field="denial_decision_id",
        metadata={"resource": "denial"},
    )


def _denied_person(keystore: KeyStore, denial: store.Denial) -> uuid.UUID | None:
    """Whom the denial refused; None once they withdrew consent (the row was unlinked)."""
    if not denial.person_enc:
        return None
    try:
        day_key = keystore.day_key(denial.day, create=False)
    except keys.KeyError_:
        raise _no_denial(" (its day has expired)") from None
    person = keys.open_row(
        day_key,
        denial.person_enc,
        venue_id=denial.venue_id.bytes,
        device_id=denial.device_id.bytes if denial.device_id else None,
        sequence=denial.sequence,
        day=denial.day,
    )
    return uuid.UUID(bytes=person)


async def snapshot(
    conn: Conn, keystore: KeyStore, decision_id: uuid.UUID, grievance_id: uuid.UUID
) -> DenialSnapshot:
    """The snapshot of the denial `decision_id` for the appeal `grievance_id`;
    NOT_FOUND when no such denial is held."""
    denial = await store.find_denial(conn, decision_id)
    if denial is None:
        raise _no_denial()
    person = _denied_person(keystore, denial)
    if person is None:
        return DenialSnapshot(denial.scan_time, denial.venue_id, risk.HIGH)
    then = await store.risk_at(conn, person, denial.receive_time)
    key = keystore.people_key()
    sealed = Sealed.GRIEVANCE_PERSON.seal(key, grievance_id, person.bytes)
    if then is None:
        # Denied, so HIGH at the door, though no change of theirs is on record.
        return DenialSnapshot(
            denial.scan_time,
            denial.venue_id,
            risk.HIGH,
            person_enc=sealed,
            people_key_id=key.key_id,
        )
    return DenialSnapshot(
        denial.scan_time,
        denial.venue_id,
        then.level,
        basis_reason=then.reason,
        basis_exposure_time=then.exposure_time,
        basis_venue_id=then.venue_id,
        basis_venue_display_name=then.venue_display_name,
        basis_overlap=then.overlap,
        basis_rule=then.rule,
        person_enc=sealed,
        people_key_id=key.key_id,
    )


async def _level_now(
    conn: Conn, keystore: KeyStore, grievance: Grievance, denial: DenialSnapshot
) -> common_pb2.RiskLevel.ValueType:
    """The appellant's level now; UNSPECIFIED when they withdrew consent (or their
    id can no longer be read)."""
    if denial.person_enc is None:
        return common_pb2.RISK_LEVEL_UNSPECIFIED
    try:
        key = keystore.people_key(denial.people_key_id)
        person = Sealed.GRIEVANCE_PERSON.open(key, grievance.grievance_id, denial.person_enc)
        person_id = uuid.UUID(bytes=person)
    except (keys.KeyError_, ValueError):
        return common_pb2.RISK_LEVEL_UNSPECIFIED
    level = await store.current_risk(conn, person_id)
    return risk.LEVELS.get(level or "", common_pb2.RISK_LEVEL_UNSPECIFIED)


async def denial_context(
    conn: Conn, keystore: KeyStore, grievance: Grievance
) -> pb.DenialContext | None:
    """What the officer sees of the denial a grievance appeals; None for other grievances."""
    denial = grievance.denial
    if denial is None:
        return None
    basis = denial.basis_columns()
    return pb.DenialContext(
        decision_id=str(grievance.denial_decision_id),
        decision_time=instant(denial.denial_time),
        venue_id=str(denial.denial_venue_id),
        risk_level=risk.LEVELS.get(denial.denial_level or "", common_pb2.RISK_LEVEL_HIGH),
        basis=risk.basis_to_proto(basis)
        if basis["reason"] or basis["rule"]
        else common_pb2.RiskBasis(),
        current_risk_level=await _level_now(conn, keystore, grievance, denial),
    )
