"""Versioned schema migrations for the SQL stores. Append, never edit, a migration."""

from __future__ import annotations

from ..telemetry.audit import GENESIS

SQLITE: list[str] = [
    # 1: runs, steps, audit
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        agent TEXT NOT NULL,
        workflow TEXT NOT NULL,
        input TEXT NOT NULL,
        state TEXT NOT NULL,
        output TEXT,
        error_code TEXT,
        error_message TEXT,
        parent_id TEXT,
        root_id TEXT NOT NULL,
        depth INTEGER NOT NULL DEFAULT 0,
        ancestry TEXT NOT NULL DEFAULT '[]',
        idempotency_key TEXT,
        budget TEXT NOT NULL DEFAULT '{}',
        usage TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        lease_owner TEXT,
        lease_expires_at REAL,
        epoch INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_state ON runs(state, created_at);
    CREATE INDEX runs_tenant ON runs(tenant, created_at);
    CREATE INDEX runs_root ON runs(root_id);
    CREATE INDEX runs_parent ON runs(parent_id);
    CREATE UNIQUE INDEX runs_idem ON runs(tenant, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE steps (
        run_id TEXT NOT NULL REFERENCES runs(id),
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        input TEXT NOT NULL,
        output TEXT,
        error TEXT,
        idempotency_key TEXT,
        attempts INTEGER NOT NULL DEFAULT 1,
        started_at REAL NOT NULL,
        finished_at REAL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE audit (
        run_id TEXT NOT NULL REFERENCES runs(id),
        seq INTEGER NOT NULL,
        time TEXT NOT NULL,
        actor TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    """,
]

SQLITE.append(
    # 2: delegation fields, budget ledgers, approvals, API keys
    """
    ALTER TABLE runs ADD COLUMN capabilities TEXT;
    ALTER TABLE runs ADD COLUMN ledgers TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE runs ADD COLUMN traceparent TEXT;
    ALTER TABLE steps ADD COLUMN reserved TEXT;
    CREATE TABLE ledgers (
        id TEXT PRIMARY KEY,
        limits TEXT NOT NULL,
        used TEXT NOT NULL,
        exhausted TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        run_id TEXT NOT NULL REFERENCES runs(id),
        root_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        kind TEXT NOT NULL,
        action TEXT NOT NULL,
        arguments TEXT NOT NULL,
        reason TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        decided_by TEXT,
        decided_at REAL,
        comment TEXT,
        on_reject TEXT NOT NULL,
        on_expiry TEXT NOT NULL
    );
    CREATE UNIQUE INDEX approvals_step ON approvals(run_id, step);
    CREATE INDEX approvals_status ON approvals(tenant, status, created_at);
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        role TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    """
)

SQLITE.append(
    # 3: the audit chain head on the run row (loss of records is tampering), backfilled from
    #    each run's chain; the crash counter of crash-loop quarantine
    f"""
    ALTER TABLE runs ADD COLUMN audit_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN audit_hash TEXT NOT NULL DEFAULT '{GENESIS}';
    ALTER TABLE runs ADD COLUMN crash_count INTEGER NOT NULL DEFAULT 0;
    UPDATE runs SET
        audit_seq = (SELECT MAX(seq) FROM audit WHERE audit.run_id = runs.id),
        audit_hash = (SELECT hash FROM audit WHERE audit.run_id = runs.id
                      ORDER BY seq DESC LIMIT 1)
        WHERE EXISTS (SELECT 1 FROM audit WHERE audit.run_id = runs.id)
    """
)

SQLITE.append(
    # 4: registered workflows (DESIGN §11): immutable versions per tenant and name
    """
    CREATE TABLE workflows (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        content_hash TEXT NOT NULL,
        author TEXT NOT NULL,
        created_at REAL NOT NULL,
        format TEXT NOT NULL,
        source TEXT NOT NULL,
        PRIMARY KEY (tenant, name, version)
    );
    """
)

SQLITE.append(
    # 5: threads (DESIGN §10): turns are runs with thread_id and turn, unique per thread (two
    #    concurrent messages can never both be turn N); the thread's own audit chain, which
    #    survives the thread's deletion (it holds the anchors of the erased runs)
    """
    ALTER TABLE runs ADD COLUMN thread_id TEXT;
    ALTER TABLE runs ADD COLUMN turn INTEGER;
    CREATE UNIQUE INDEX runs_thread_turn ON runs(thread_id, turn) WHERE thread_id IS NOT NULL;
    CREATE TABLE threads (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        agent TEXT NOT NULL,
        workflow TEXT NOT NULL,
        workflow_version INTEGER,
        title TEXT NOT NULL,
        metadata TEXT NOT NULL,
        budget TEXT NOT NULL,
        ledger_id TEXT,
        forked_from TEXT,
        forked_turn INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        deleted_at REAL
    );
    CREATE INDEX threads_tenant ON threads(tenant, updated_at);
    CREATE TABLE thread_audit (
        thread_id TEXT NOT NULL REFERENCES threads(id),
        seq INTEGER NOT NULL,
        time TEXT NOT NULL,
        actor TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (thread_id, seq)
    );
    """
)

SQLITE.append(
    # 6: typed outputs (DESIGN §10): what a run's output holds, text or canonical JSON
    """
    ALTER TABLE runs ADD COLUMN output_type TEXT NOT NULL DEFAULT 'text';
    """
)
