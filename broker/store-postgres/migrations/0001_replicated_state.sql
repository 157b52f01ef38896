-- onceonly schema version 1: what broker replicas share.
-- Applied by `onceonly_store_postgres::migrate` in one transaction; never
-- edit a released migration, add the next one.

-- Consents, one row each, as the embedded store keeps them: the subject
-- only as its keyed pseudonym and sealed under a key the replicas hold and
-- the database does not.
CREATE TABLE consents (
    consent_id        text PRIMARY KEY,
    subject_scheme    integer NOT NULL,
    subject_pseudonym text NOT NULL,
    subject_sealed    text NOT NULL,
    authority_id      text NOT NULL,
    evidence_type     text NOT NULL,
    purpose           text NOT NULL,
    granted_at_ms     bigint NOT NULL,
    expires_at_ms     bigint NOT NULL,
    revoked_at_ms     bigint,
    recorded_by       text NOT NULL
);
CREATE INDEX consents_by_subject ON consents (subject_pseudonym, granted_at_ms DESC);

-- The idempotency window across replicas: a request id's first exchange
-- and, once final, its outcome. The outcome is sealed under a key the
-- replicas share (evidence is never stored in the clear); NULL while the
-- first exchange still runs.
CREATE TABLE idempotency (
    caller_id      text NOT NULL,
    request_id     text NOT NULL,
    fingerprint    bytea NOT NULL,
    exchange_id    text NOT NULL,
    outcome_sealed bytea,
    started_at_ms  bigint NOT NULL,
    expires_at_ms  bigint NOT NULL,
    PRIMARY KEY (caller_id, request_id)
);
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at_ms);

-- Audit records each replica committed before answering, in commit order,
-- not yet in the tree.
CREATE TABLE audit_queue (
    queue_id     bigserial PRIMARY KEY,
    replica      text NOT NULL,
    leaf_hash    bytea NOT NULL,
    record       bytea NOT NULL,
    queued_at_ms bigint NOT NULL
);

-- The log, as the sequencer writes it: leaves by index, the perfect
-- subtrees they complete, and a signed head per sequencing run.
CREATE TABLE audit_leaves (
    log_index bigint PRIMARY KEY,
    queue_id  bigint NOT NULL UNIQUE,
    leaf_hash bytea NOT NULL,
    record    bytea NOT NULL
);
CREATE TABLE audit_nodes (
    level      integer NOT NULL,
    node_index bigint NOT NULL,
    hash       bytea NOT NULL,
    PRIMARY KEY (level, node_index)
);
CREATE TABLE audit_heads (
    tree_size       bigint PRIMARY KEY,
    root_hash       bytea NOT NULL,
    timestamp_ms    bigint NOT NULL,
    key_id          bytea NOT NULL,
    signature       bytea NOT NULL,
    sequencer_epoch bigint NOT NULL
);

-- The one sequencer's lease. Each new holder takes the next epoch; a
-- sequencing transaction writes only while the row still names its epoch
-- (fencing), so a sequencer that lost its lease cannot publish a head.
CREATE TABLE sequencer_lease (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder     text NOT NULL,
    epoch      bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
