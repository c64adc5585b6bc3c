-- claim_keys.sql, then the batch's resultless keys locked, then accounts::lock_all, in one
-- statement (batch_plan::claim_keys_and_lock): $1 the distinct keys in ascending byte
-- order, $2 their first request's fingerprint, $3 the operation, $4 the accounts to lock
-- in ascending id order. The Append of a UNION ALL runs its branches in order, and each
-- reads its CTE to its end: the keys are claimed first; then the keys stored before
-- without a result are locked (FOR UPDATE, ascending byte order), as idempotency::begin
-- locks such a key before its accounts; then the accounts are locked (FOR NO KEY UPDATE,
-- ascending id). So a batch and a single request sharing a key stored before this
-- statement began take key, then accounts, in one order. A key committed or given back
-- while the statement waited is not in its snapshot: batch_plan::read_used locks or
-- claims it after the accounts, a rare inversion PostgreSQL breaks (40P01, retried). Rows: part 0, one per key this call inserted (fresh;
-- account columns NULL); part 1, one per resultless key now locked (read again by the
-- caller under the lock); part 2, one per account found, by ascending id (claimed NULL).
WITH claimed AS (
    INSERT INTO idempotency_keys (key, operation, request_fingerprint)
    SELECT k, $3, f
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(k, f, n)
    ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING key
), resultless AS MATERIALIZED (
    SELECT i.key
    FROM idempotency_keys i
    WHERE i.key = ANY($1::text[]) AND i.result_id IS NULL
    ORDER BY i.key COLLATE "C"
    FOR UPDATE
), locked AS MATERIALIZED (
    SELECT a.id, a.owner, a.currency, a.kind, a.balance_minor, a.overdraft_limit_minor, a.status
    FROM accounts a
    WHERE a.id = ANY($4::int8[])
    ORDER BY a.id
    FOR NO KEY UPDATE
)
SELECT 0 AS part, key AS claimed, NULL::int8 AS id, NULL::text AS owner, NULL::text AS currency,
       NULL::text AS kind, NULL::int8 AS balance_minor, NULL::int8 AS overdraft_limit_minor, NULL::text AS status
FROM claimed
UNION ALL
SELECT 1, key, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM resultless
UNION ALL
SELECT 2, NULL, id, owner, currency, kind, balance_minor, overdraft_limit_minor, status
FROM locked
