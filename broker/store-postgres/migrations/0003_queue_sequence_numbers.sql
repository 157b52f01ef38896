-- onceonly schema version 3: per-replica sequence numbers on queued audit
-- records. Each replica numbers the records it queues 1, 2, 3, ... within
-- a segment (it starts a new segment after any commit whose outcome it
-- cannot know, and each row of it names the last number committed before
-- it: chain_segment, chain_last), under the row's tag. The sequencer
-- keeps, per replica and
-- segment, the last number it took (tagged too), and so sees a queued row
-- deleted before it was sequenced (a gap in the numbers) or a copied one
-- (a number taken twice), whichever replica wrote it and whether or not
-- that replica still runs. Rows queued before this migration keep number
-- 0 and their old tag.

ALTER TABLE audit_queue
    ADD COLUMN segment       bigint NOT NULL DEFAULT 0,
    ADD COLUMN replica_seq   bigint NOT NULL DEFAULT 0,
    ADD COLUMN chain_segment bigint NOT NULL DEFAULT 0,
    ADD COLUMN chain_last    bigint NOT NULL DEFAULT 0;
ALTER TABLE audit_quarantine
    ADD COLUMN segment       bigint NOT NULL DEFAULT 0,
    ADD COLUMN replica_seq   bigint NOT NULL DEFAULT 0,
    ADD COLUMN chain_segment bigint NOT NULL DEFAULT 0,
    ADD COLUMN chain_last    bigint NOT NULL DEFAULT 0;

-- Per replica and segment, the last number the sequencer took, with its
-- tag: a mark edited forward (to hide a deleted row) does not authenticate.
CREATE TABLE audit_queue_marks (
    replica  text NOT NULL,
    segment  bigint NOT NULL,
    last_seq bigint NOT NULL,
    mac      bytea NOT NULL,
    PRIMARY KEY (replica, segment)
);

-- Numbers the sequencer found missing: records a replica committed (and
-- receipted) that were deleted from the queue before they were sequenced.
-- For the operator; the log goes on without them, loudly.
CREATE TABLE audit_queue_gaps (
    replica         text NOT NULL,
    segment         bigint NOT NULL,
    first_seq       bigint NOT NULL,
    last_seq        bigint NOT NULL,
    sequencer_epoch bigint NOT NULL,
    noticed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica, segment, first_seq)
);
