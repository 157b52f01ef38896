-- onceonly schema version 2: what replicas need at work. First, what
-- queries and receipts read from the log's leaves, beside the record
-- itself; the sequencer fills these columns from each record as it gives
-- it its index.

ALTER TABLE audit_leaves
    ADD COLUMN replica           text NOT NULL DEFAULT '',
    ADD COLUMN queued_at_ms      bigint NOT NULL DEFAULT 0,
    ADD COLUMN subject_pseudonym bytea,
    ADD COLUMN caller_id         text NOT NULL DEFAULT '',
    ADD COLUMN evidence_type     text NOT NULL DEFAULT '',
    ADD COLUMN connector_id      text NOT NULL DEFAULT '',
    ADD COLUMN outcome           integer NOT NULL DEFAULT 0,
    ADD COLUMN received_s        bigint NOT NULL DEFAULT 0;

-- Each consent's HMAC (every field, revocation included) under the same
-- replicas' key: a consent row inserted by anyone else does not count.
ALTER TABLE consents ADD COLUMN mac bytea NOT NULL DEFAULT ''::bytea;

-- Each queued record's HMAC under a key the replicas hold and the database
-- does not: the sequencer signs into the log only records a replica wrote.
ALTER TABLE audit_queue ADD COLUMN mac bytea NOT NULL DEFAULT ''::bytea;

-- Queued rows the sequencer set aside (their tag or encoding is wrong),
-- for the operator to inspect; the log goes on without them.
CREATE TABLE audit_quarantine (
    queue_id     bigint PRIMARY KEY,
    replica      text NOT NULL,
    leaf_hash    bytea NOT NULL,
    record       bytea NOT NULL,
    mac          bytea NOT NULL,
    queued_at_ms bigint NOT NULL,
    reason       text NOT NULL,
    set_aside_at timestamptz NOT NULL DEFAULT now()
);

-- A receipt names its record by leaf hash (GetInclusionProof by hash).
CREATE INDEX audit_leaves_by_leaf_hash ON audit_leaves (leaf_hash);
-- The citizen's view and an authority's own records.
CREATE INDEX audit_leaves_by_subject ON audit_leaves (subject_pseudonym, log_index)
    WHERE subject_pseudonym IS NOT NULL;
CREATE INDEX audit_leaves_by_caller ON audit_leaves (caller_id, log_index);

-- Every replica must hold the same keys: the pseudonym key (or consents
-- and records would match no citizen at another replica) and the audit
-- key (or heads would be signed by two keys). The first replica records
-- each key's check value; later ones must match it.
CREATE TABLE key_checks (
    name        text PRIMARY KEY,
    check_value text NOT NULL
);

-- Quotas shared by replicas: per bucket the GCRA's theoretical arrival
-- time (microseconds on the database's clock). Unlogged: a crash of the
-- database starts every quota afresh, and counting costs no WAL flush.
CREATE UNLOGGED TABLE quota_gcra (
    bucket text PRIMARY KEY,
    tat_us bigint NOT NULL
);
