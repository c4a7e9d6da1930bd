-- Group commits are recognised across a failover by a mark, not only by their
-- transaction id.
--
-- A group commit whose connection is lost while it commits asks what became of
-- its transaction (pg_xact_status). On the same server that answer is exact. After
-- a failover it is not: a transaction whose WAL never reached the standby (the
-- primary died before sending it, committed or not) is unknown to the promoted
-- standby, which hands the same id to the next transaction it runs, so the status
-- it reports may be another transaction's. Each group commit therefore also writes
-- a random token here in its own transaction: it committed exactly when its token
-- is there (once no transaction with its id is still in progress). The CheckIn
-- servers remove marks older than an hour, far longer than any commit is retried.

CREATE TABLE commit_marks (
    token uuid PRIMARY KEY,
    made timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commit_marks_made ON commit_marks (made);

GRANT SELECT, INSERT, DELETE ON commit_marks TO stopcovid_checkin;
