-- Reserved: migration 0006 belongs to the exactly-once change of issue 10,
-- made on another branch. This placeholder only keeps the numbers of this
-- branch gapless (services/core/migrate.py refuses gaps) and does nothing; it
-- must be dropped when that branch's 0006 is merged.
SELECT 1;
