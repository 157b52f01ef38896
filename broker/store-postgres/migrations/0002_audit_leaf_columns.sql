-- onceonly schema version 2: what queries and receipts read from the log's
-- leaves, beside the record itself. The sequencer fills these columns from
-- each record as it gives it its index.

ALTER TABLE audit_leaves
    ADD COLUMN replica           text NOT NULL DEFAULT '',
    ADD COLUMN queued_at_ms      bigint NOT NULL DEFAULT 0,
    ADD COLUMN subject_pseudonym bytea,
    ADD COLUMN caller_id         text NOT NULL DEFAULT '',
    ADD COLUMN evidence_type     text NOT NULL DEFAULT '',
    ADD COLUMN connector_id      text NOT NULL DEFAULT '',
    ADD COLUMN outcome           integer NOT NULL DEFAULT 0,
    ADD COLUMN received_s        bigint NOT NULL DEFAULT 0;

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
