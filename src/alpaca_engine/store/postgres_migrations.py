"""Versioned schema migrations for the PostgreSQL store. Append, never edit, a migration.

Each entry is one script run in the migration transaction (several statements are fine: the
script is sent without parameters). Table names are unqualified so they land in the schema the
store's ``search_path`` selects.

Choices that keep the semantics of the SQLite store:

* ids are ``COLLATE "C"`` so ``ORDER BY id`` compares bytes, like SQLite's BINARY collation;
* times are ``DOUBLE PRECISION`` (a Python float round-trips exactly);
* integers are ``BIGINT`` (SQLite integers are 64-bit);
* ``audit.data`` is ``JSON``, not ``JSONB``: the audit hash covers the data, and JSONB rewrites
  numbers (``1e20`` comes back as the integer ``100000000000000000000``), which would change the
  canonical JSON and break ``verify_chain``. JSON keeps the text exactly as written.
"""

from __future__ import annotations

from ..telemetry.audit import GENESIS

POSTGRES: list[str] = [
    # 1: runs, steps, audit
    """
    CREATE TABLE runs (
        id TEXT COLLATE "C" PRIMARY KEY,
        tenant TEXT NOT NULL,
        agent TEXT NOT NULL,
        workflow TEXT NOT NULL,
        input TEXT NOT NULL,
        state TEXT NOT NULL,
        output TEXT,
        error_code TEXT,
        error_message TEXT,
        parent_id TEXT COLLATE "C",
        root_id TEXT COLLATE "C" NOT NULL,
        depth BIGINT NOT NULL DEFAULT 0,
        ancestry JSONB NOT NULL DEFAULT '[]',
        idempotency_key TEXT,
        budget JSONB NOT NULL DEFAULT '{}',
        usage JSONB NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        lease_owner TEXT,
        lease_expires_at DOUBLE PRECISION,
        epoch BIGINT NOT NULL DEFAULT 0,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX runs_state ON runs(state, created_at, id);
    CREATE INDEX runs_queued ON runs(created_at, id) WHERE state = 'queued';
    CREATE INDEX runs_leases ON runs(lease_expires_at) WHERE state = 'running';
    CREATE INDEX runs_tenant ON runs(tenant, created_at);
    CREATE INDEX runs_root ON runs(root_id);
    CREATE INDEX runs_parent ON runs(parent_id);
    CREATE UNIQUE INDEX runs_idem ON runs(tenant, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE steps (
        run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id),
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        input JSONB NOT NULL,
        output JSONB,
        error JSONB,
        idempotency_key TEXT,
        attempts BIGINT NOT NULL DEFAULT 1,
        started_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE audit (
        run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id),
        seq BIGINT NOT NULL,
        time TEXT NOT NULL,
        actor TEXT NOT NULL,
        kind TEXT NOT NULL,
        data JSON NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    """,
]

POSTGRES.append(
    # 2: delegation fields, budget ledgers, approvals, API keys (as SQLite migration 2)
    """
    ALTER TABLE runs ADD COLUMN capabilities JSONB;
    ALTER TABLE runs ADD COLUMN ledgers JSONB NOT NULL DEFAULT '[]';
    ALTER TABLE runs ADD COLUMN traceparent TEXT;
    ALTER TABLE steps ADD COLUMN reserved JSONB;
    CREATE TABLE ledgers (
        id TEXT COLLATE "C" PRIMARY KEY,
        limits JSONB NOT NULL,
        used JSONB NOT NULL,
        exhausted TEXT,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE approvals (
        id TEXT COLLATE "C" PRIMARY KEY,
        tenant TEXT NOT NULL,
        run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id),
        root_id TEXT COLLATE "C" NOT NULL,
        step BIGINT NOT NULL,
        kind TEXT NOT NULL,
        action TEXT NOT NULL,
        arguments JSONB NOT NULL,
        reason TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        decided_by TEXT,
        decided_at DOUBLE PRECISION,
        comment TEXT,
        on_reject TEXT NOT NULL,
        on_expiry TEXT NOT NULL
    );
    CREATE UNIQUE INDEX approvals_step ON approvals(run_id, step);
    CREATE INDEX approvals_status ON approvals(tenant, status, created_at);
    CREATE INDEX approvals_expiry ON approvals(expires_at) WHERE status = 'pending';
    CREATE TABLE api_keys (
        id TEXT COLLATE "C" PRIMARY KEY,
        tenant TEXT NOT NULL,
        role TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE INDEX api_keys_tenant ON api_keys(tenant, created_at);
    """
)

POSTGRES.append(
    # 3: the audit chain head on the run row (loss of records is tampering), backfilled from
    #    each run's chain; the crash counter of crash-loop quarantine (as SQLite migration 3)
    f"""
    ALTER TABLE runs ADD COLUMN audit_seq BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN audit_hash TEXT NOT NULL DEFAULT '{GENESIS}';
    ALTER TABLE runs ADD COLUMN crash_count BIGINT NOT NULL DEFAULT 0;
    UPDATE runs SET audit_seq = head.seq, audit_hash = head.hash
        FROM (SELECT DISTINCT ON (run_id) run_id, seq, hash FROM audit
              ORDER BY run_id, seq DESC) AS head
        WHERE head.run_id = runs.id;
    """
)

POSTGRES.append(
    # 4: registered workflows (as SQLite migration 4); the primary key is what makes two
    # concurrent pushes of one name unable to take the same version number
    """
    CREATE TABLE workflows (
        tenant TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        version BIGINT NOT NULL,
        content_hash TEXT NOT NULL,
        author TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        format TEXT NOT NULL,
        source TEXT NOT NULL,
        PRIMARY KEY (tenant, name, version)
    );
    """
)

POSTGRES.append(
    # 5: threads (as SQLite migration 5); the unique (thread_id, turn) key is the guard that
    #    two concurrent messages never both become turn N (create_turn also locks the thread)
    """
    ALTER TABLE runs ADD COLUMN thread_id TEXT COLLATE "C";
    ALTER TABLE runs ADD COLUMN turn BIGINT;
    CREATE UNIQUE INDEX runs_thread_turn ON runs(thread_id, turn) WHERE thread_id IS NOT NULL;
    CREATE TABLE threads (
        id TEXT COLLATE "C" PRIMARY KEY,
        tenant TEXT NOT NULL,
        agent TEXT NOT NULL,
        workflow TEXT NOT NULL,
        workflow_version BIGINT,
        title TEXT NOT NULL,
        metadata JSONB NOT NULL,
        budget JSONB NOT NULL,
        ledger_id TEXT COLLATE "C",
        forked_from TEXT COLLATE "C",
        forked_turn BIGINT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        deleted_at DOUBLE PRECISION
    );
    CREATE INDEX threads_tenant ON threads(tenant, updated_at);
    CREATE TABLE thread_audit (
        thread_id TEXT COLLATE "C" NOT NULL REFERENCES threads(id),
        seq BIGINT NOT NULL,
        time TEXT NOT NULL,
        actor TEXT NOT NULL,
        kind TEXT NOT NULL,
        data JSON NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (thread_id, seq)
    );
    """
)

POSTGRES.append(
    # 6: typed outputs (as SQLite migration 6)
    """
    ALTER TABLE runs ADD COLUMN output_type TEXT NOT NULL DEFAULT 'text';
    """
)

POSTGRES.append(
    # 7: one journal write in one statement (DESIGN §4, §5, §7): a server-side function that
    #    fences the run by epoch, checks the audit head and the ledger values the caller
    #    computed against (compare-and-set: the audit hashes and the budget arithmetic stay in
    #    Python, ``telemetry/audit.py`` and ``budget.py``), debits the ledgers, upserts the
    #    step and appends the audit records with the new head on the run row. Anything stale
    #    writes nothing and says so; the store then takes its locked path.
    #
    #    The run row's UPDATE is the fence: it takes the row lock and, under it, READ
    #    COMMITTED re-evaluates epoch, state and head on the newest row version, so a claim,
    #    a steal or another actor's append either committed before (no match) or waits. Ledger
    #    rows are then updated one by one in id order (as the locked path locks them), each
    #    only if it still holds the expected values; a miss raises AL001, which rolls the
    #    whole statement back.
    """
    CREATE OR REPLACE FUNCTION alpaca_journal_step(
        p_run_id TEXT, p_epoch BIGINT,
        p_head_seq BIGINT, p_head_hash TEXT, p_new_hash TEXT,
        p_time TEXT, p_actors TEXT[], p_kinds TEXT[], p_data TEXT[], p_prev TEXT[],
        p_hashes TEXT[],
        p_seq BIGINT, p_kind TEXT, p_name TEXT, p_status TEXT, p_input JSONB,
        p_output JSONB, p_error JSONB, p_idempotency_key TEXT, p_attempts BIGINT,
        p_started_at DOUBLE PRECISION, p_finished_at DOUBLE PRECISION, p_reserved JSONB,
        p_reserves BOOLEAN, p_ledgers JSONB, p_terminal TEXT[],
        OUT o_status TEXT, OUT o_epoch BIGINT, OUT o_cancel BOOLEAN)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        run RECORD;
        lid TEXT;
        n INTEGER := COALESCE(array_length(p_kinds, 1), 0);
    BEGIN
        IF p_reserves AND EXISTS (SELECT 1 FROM steps s WHERE s.run_id = p_run_id
                                  AND s.seq = p_seq AND s.reserved IS NOT NULL) THEN
            o_status := 'reserved'; RETURN;  -- reserved before a crash: never twice
        END IF;
        UPDATE runs r SET audit_seq = CASE WHEN n > 0 THEN p_head_seq + n ELSE r.audit_seq END,
                audit_hash = CASE WHEN n > 0 THEN p_new_hash ELSE r.audit_hash END
            WHERE r.id = p_run_id AND r.epoch = p_epoch AND NOT (r.state = ANY(p_terminal))
                AND (n = 0 OR (r.audit_seq = p_head_seq AND r.audit_hash = p_head_hash))
            RETURNING r.epoch, r.cancel_requested INTO o_epoch, o_cancel;
        IF NOT FOUND THEN  -- why not (nothing was written, so no lock is needed to say)
            SELECT r.epoch, r.state, r.cancel_requested INTO run FROM runs r
                WHERE r.id = p_run_id;
            IF NOT FOUND THEN
                o_status := 'missing';
            ELSE
                o_epoch := run.epoch; o_cancel := run.cancel_requested;
                o_status := CASE WHEN run.epoch <> p_epoch THEN 'lease_lost'
                                 WHEN run.state = ANY(p_terminal) THEN 'closed'
                                 ELSE 'stale_head' END;  -- another actor appended
            END IF;
            RETURN;
        END IF;
        IF p_ledgers IS NOT NULL THEN
            FOR lid IN SELECT k FROM jsonb_object_keys(p_ledgers) AS k
                    ORDER BY k COLLATE "C" LOOP
                UPDATE ledgers l SET used = p_ledgers -> lid -> 'new',
                        exhausted = COALESCE(l.exhausted, p_ledgers -> lid ->> 'exhaust')
                    WHERE l.id = lid AND l.used = p_ledgers -> lid -> 'used'
                        AND l.exhausted IS NOT DISTINCT FROM (p_ledgers -> lid ->> 'exhausted');
                IF NOT FOUND THEN  -- a sibling moved the ledger: undo everything
                    RAISE EXCEPTION 'ledger % changed', lid USING ERRCODE = 'AL001';
                END IF;
            END LOOP;
        END IF;
        INSERT INTO steps AS s (run_id, seq, kind, name, status, input, output, error,
                idempotency_key, attempts, started_at, finished_at, reserved)
            VALUES (p_run_id, p_seq, p_kind, p_name, p_status, p_input, p_output, p_error,
                p_idempotency_key, p_attempts, p_started_at, p_finished_at, p_reserved)
            ON CONFLICT (run_id, seq) DO UPDATE SET status = excluded.status,
                input = excluded.input, output = excluded.output, error = excluded.error,
                attempts = excluded.attempts, finished_at = excluded.finished_at,
                reserved = COALESCE(excluded.reserved, s.reserved);
        IF n > 0 THEN
            INSERT INTO audit (run_id, seq, time, actor, kind, data, prev_hash, hash)
                SELECT p_run_id, p_head_seq + i, p_time, p_actors[i], p_kinds[i],
                       p_data[i]::json, p_prev[i], p_hashes[i]
                FROM generate_subscripts(p_kinds, 1) AS i;
        END IF;
        o_status := 'ok';
    END
    $fn$;
    """
)

POSTGRES.append(
    # 8. Journal writes in one statement and one parameter (``PostgresStore.save_steps``):
    #    a step's outcome and the next step's ``started``, one commit per step. Each write is
    #    an object of ``p_writes`` (encoded by the client as one JSON text: one encode instead
    #    of a parameter adapter each, the client's CPU being the larger part of a step) and is
    #    made exactly as migration 7's ``alpaca_journal_step`` makes one: the same fence,
    #    head and ledger checks, debit, step upsert and audit append (inline here, to spare
    #    a function call and its array arguments per write). Audit data stays text (``d``:
    #    the canonical JSON the hash covers, kept as written). A write is made only if the
    #    one before it was (``ok``), and with ``p_unless_cancelled`` the last only if the run
    #    has no cancel request as the write before it saw under the run's lock. Returns
    #    ``status,epoch,cancel`` per write attempted, joined by ``|``, and ``skipped`` for a
    #    last write left out for a cancel request.
    """
    CREATE OR REPLACE FUNCTION alpaca_journal_steps(
        p_writes JSONB, p_unless_cancelled BOOLEAN, p_terminal TEXT[])
    RETURNS TEXT LANGUAGE plpgsql AS $fn$
    DECLARE
        w JSONB;
        run RECORD;
        lid TEXT;
        i INTEGER := 0;
        n_writes INTEGER := jsonb_array_length(p_writes);
        n INTEGER;
        v_run TEXT;
        v_epoch BIGINT;
        v_head BIGINT;
        v_seq BIGINT;
        v_status TEXT;
        o_epoch BIGINT;
        o_cancel BOOLEAN := FALSE;
        result TEXT := '';
    BEGIN
        FOR w IN SELECT value FROM jsonb_array_elements(p_writes) LOOP
            i := i + 1;
            IF p_unless_cancelled AND i = n_writes AND o_cancel THEN
                RETURN result || '|skipped';
            END IF;
            v_run := w ->> 'run';
            v_epoch := (w ->> 'epoch')::BIGINT;
            v_head := (w ->> 'hs')::BIGINT;
            v_seq := (w ->> 'seq')::BIGINT;
            n := jsonb_array_length(w -> 'audit');
            v_status := NULL;
            IF (w ->> 'reserves')::BOOLEAN AND EXISTS (
                    SELECT 1 FROM steps s WHERE s.run_id = v_run AND s.seq = v_seq
                    AND s.reserved IS NOT NULL) THEN
                v_status := 'reserved';  -- reserved before a crash: never twice
                o_epoch := NULL; o_cancel := NULL;
            ELSE
                UPDATE runs r
                    SET audit_seq = CASE WHEN n > 0 THEN v_head + n ELSE r.audit_seq END,
                        audit_hash = CASE WHEN n > 0 THEN w ->> 'nh' ELSE r.audit_hash END
                    WHERE r.id = v_run AND r.epoch = v_epoch AND NOT (r.state = ANY(p_terminal))
                        AND (n = 0 OR (r.audit_seq = v_head AND r.audit_hash = w ->> 'hh'))
                    RETURNING r.epoch, r.cancel_requested INTO o_epoch, o_cancel;
                IF NOT FOUND THEN  -- why not (nothing was written, so no lock is needed)
                    SELECT r.epoch, r.state, r.cancel_requested INTO run FROM runs r
                        WHERE r.id = v_run;
                    IF NOT FOUND THEN
                        v_status := 'missing';
                        o_epoch := NULL; o_cancel := NULL;
                    ELSE
                        o_epoch := run.epoch; o_cancel := run.cancel_requested;
                        v_status := CASE WHEN run.epoch <> v_epoch THEN 'lease_lost'
                                         WHEN run.state = ANY(p_terminal) THEN 'closed'
                                         ELSE 'stale_head' END;  -- another actor appended
                    END IF;
                END IF;
            END IF;
            IF v_status IS NOT NULL THEN
                RETURN result || CASE WHEN i > 1 THEN '|' ELSE '' END
                    || concat_ws(',', v_status, o_epoch, o_cancel);
            END IF;
            IF jsonb_typeof(w -> 'ledgers') = 'object' THEN
                FOR lid IN SELECT k FROM jsonb_object_keys(w -> 'ledgers') AS k
                        ORDER BY k COLLATE "C" LOOP
                    UPDATE ledgers l SET used = w -> 'ledgers' -> lid -> 'new',
                            exhausted = COALESCE(l.exhausted, w -> 'ledgers' -> lid ->> 'exhaust')
                        WHERE l.id = lid AND l.used = w -> 'ledgers' -> lid -> 'used'
                            AND l.exhausted IS NOT DISTINCT FROM
                                (w -> 'ledgers' -> lid ->> 'exhausted');
                    IF NOT FOUND THEN  -- a sibling moved the ledger: undo everything
                        RAISE EXCEPTION 'ledger % changed', lid USING ERRCODE = 'AL001';
                    END IF;
                END LOOP;
            END IF;
            INSERT INTO steps AS s (run_id, seq, kind, name, status, input, output, error,
                    idempotency_key, attempts, started_at, finished_at, reserved)
                VALUES (v_run, v_seq, w ->> 'kind', w ->> 'name', w ->> 'status', w -> 'input',
                    NULLIF(w -> 'output', 'null'::jsonb), NULLIF(w -> 'error', 'null'::jsonb),
                    w ->> 'ik', (w ->> 'attempts')::BIGINT, (w ->> 'sa')::DOUBLE PRECISION,
                    (w ->> 'fa')::DOUBLE PRECISION, NULLIF(w -> 'reserved', 'null'::jsonb))
                ON CONFLICT (run_id, seq) DO UPDATE SET status = excluded.status,
                    input = excluded.input, output = excluded.output, error = excluded.error,
                    attempts = excluded.attempts, finished_at = excluded.finished_at,
                    reserved = COALESCE(excluded.reserved, s.reserved);
            IF n > 0 THEN
                INSERT INTO audit (run_id, seq, time, actor, kind, data, prev_hash, hash)
                    SELECT v_run, v_head + e.ord, w ->> 't', e.rec ->> 'a', e.rec ->> 'k',
                           (e.rec ->> 'd')::json, e.rec ->> 'p', e.rec ->> 'h'
                    FROM jsonb_array_elements(w -> 'audit') WITH ORDINALITY AS e(rec, ord);
            END IF;
            result := result || CASE WHEN i > 1 THEN '|' ELSE '' END
                || concat_ws(',', 'ok', o_epoch, o_cancel);
        END LOOP;
        RETURN result;
    END
    $fn$;
    """
)
