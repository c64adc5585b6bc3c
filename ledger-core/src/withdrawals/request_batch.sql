-- A batch of withdrawal requests recorded in one statement (withdrawals::intake).
-- $1..$6 the created requests in batch order (key, fingerprint, account, currency,
-- amount, destination), $7 the claimed keys nothing was created under (given back).
-- One INSERT statement, so the withdrawals_notify trigger wakes the daemon once, as
-- for a single request.
WITH w AS MATERIALIZED (
    -- Each request's id is drawn here, in batch order, so nothing joins back.
    SELECT t.*, nextval('withdrawals_id_seq') AS id
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[])
        WITH ORDINALITY AS t(key, fingerprint, account_id, currency, amount, destination, n)
    ORDER BY n
), ins AS (
    INSERT INTO withdrawals (id, account_id, currency, amount_minor, destination, idempotency_key)
    SELECT id, account_id, currency, amount, destination, key FROM w ORDER BY id
    RETURNING 1
), k AS (
    -- The fingerprint too: the key may have been claimed with an earlier item's request
    -- that was refused; and the operation: a key taken over may have been another's.
    UPDATE idempotency_keys i SET result_id = w.id, request_fingerprint = w.fingerprint, operation = 'withdrawal'
    FROM w WHERE i.key = w.key AND i.result_id IS NULL
    RETURNING 1
), gone AS (
    DELETE FROM idempotency_keys i WHERE i.key = ANY($7::text[]) AND i.result_id IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins) AS inserted,
       (SELECT count(*) FROM k) AS keys,
       (SELECT count(*) FROM gone) AS given_back,
       COALESCE((SELECT array_agg(w.id ORDER BY w.n) FROM w), '{}') AS ids
