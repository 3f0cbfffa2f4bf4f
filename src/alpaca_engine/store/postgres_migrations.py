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
