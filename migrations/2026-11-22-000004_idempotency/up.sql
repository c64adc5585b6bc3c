-- One row per caller-supplied key. The first request under a key inserts the row (and
-- holds its index entry until commit, so a concurrent duplicate waits); later requests
-- compare their fingerprint and either replay result_id or are refused as a conflict.
CREATE TABLE idempotency_keys (
    key                 TEXT PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 128),
    operation           TEXT NOT NULL,
    request_fingerprint TEXT NOT NULL,
    result_id           BIGINT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
