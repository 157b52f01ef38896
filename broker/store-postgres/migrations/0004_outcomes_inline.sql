-- onceonly schema version 4: sealed outcomes stored as they are. An
-- outcome is ciphertext (AES-256-GCM), which no compression shrinks, and
-- at a few KiB (the evidence it carries) PostgreSQL would try to compress
-- every one and then move it out of line into the TOAST table: per
-- request a failed compression, two TOAST rows and their index entries,
-- written and later deleted. Kept uncompressed and in the row up to the
-- largest size a row can take.
ALTER TABLE idempotency ALTER COLUMN outcome_sealed SET STORAGE EXTERNAL;
ALTER TABLE idempotency SET (toast_tuple_target = 8160);
