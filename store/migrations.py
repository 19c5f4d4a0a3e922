"""The store's schema, as an ordered list of named migrations.

Each migration runs once, in order, inside a transaction, and is recorded in ``_migrations``. Never edit a
migration that has shipped: append a new one.

Span columns follow the OpenTelemetry GenAI semantic conventions: the column is the attribute name without its
``gen_ai.`` prefix, dots turned into underscores (``gen_ai.request.model`` -> ``request_model``);
:data:`store.spans.OTEL_ATTRIBUTES` holds the exact mapping.
"""

from __future__ import annotations

import duckdb

from store import idkeys

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_spans",
        """
        CREATE TABLE spans (
            span_id VARCHAR PRIMARY KEY,        -- OTel span id (16 hex); the x-lightwire-span-id header
            trace_id VARCHAR NOT NULL,          -- OTel trace id (32 hex), continued from the client's traceparent
            parent_span_id VARCHAR,             -- the client's span, when it sent a traceparent
            session_id VARCHAR,                 -- gen_ai.conversation.id
            operation_name VARCHAR NOT NULL,    -- chat | text_completion
            provider_name VARCHAR NOT NULL,     -- vllm | openai (any OpenAI-compatible server) | litellm
            request_model VARCHAR,              -- the model the client asked for
            response_model VARCHAR,             -- the model (adapter) that actually served it
            response_id VARCHAR,                -- the completion id the client saw
            request_stream BOOLEAN NOT NULL,
            request_max_tokens INTEGER,
            request_temperature DOUBLE,
            request_top_p DOUBLE,
            response_finish_reasons VARCHAR[],
            usage_input_tokens INTEGER,
            usage_output_tokens INTEGER,
            request JSON NOT NULL,              -- the body the client sent
            response JSON,                      -- the body the client got; streams reassembled
            prompt_token_ids INTEGER[],
            completion_token_ids INTEGER[][],   -- one list per choice
            completion_logprobs FLOAT[][],      -- logprob of each sampled token, one list per choice
            start_time TIMESTAMPTZ NOT NULL,
            duration_ms DOUBLE NOT NULL,
            time_to_first_chunk_ms DOUBLE,      -- streams: first chunk sent to the client
            http_status INTEGER,                -- what the client got; 499 = client went away
            error_type VARCHAR,                 -- null on success
            error_message VARCHAR
        );
        CREATE INDEX spans_response_id ON spans (response_id);
        CREATE INDEX spans_start_time ON spans (start_time);
        """,
    ),
    (
        "002_sessions_feedback",
        """
        ALTER TABLE spans ADD COLUMN turn_index INTEGER;   -- order of the call in its session, from 0
        ALTER TABLE spans ADD COLUMN session_source VARCHAR;  -- header | path | traceparent | linked | new
        CREATE INDEX spans_session_id ON spans (session_id);
        CREATE TABLE feedback (
            feedback_id VARCHAR PRIMARY KEY,    -- the caller's, for idempotency, or generated
            span_id VARCHAR,                    -- the call it scores; null for session-wide feedback
            session_id VARCHAR,                 -- the session it belongs to
            name VARCHAR NOT NULL,              -- several named rewards per target; default 'reward'
            value DOUBLE NOT NULL,              -- true/false arrive as 1/0
            comment VARCHAR,
            source VARCHAR NOT NULL,            -- api | hook:module:function
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE INDEX feedback_span_id ON feedback (span_id);
        CREATE INDEX feedback_session_id ON feedback (session_id);
        CREATE TABLE sessions (
            session_id VARCHAR PRIMARY KEY,
            ended_at TIMESTAMPTZ NOT NULL,      -- closed by POST /sessions/<id>/end or after the idle timeout
            end_reason VARCHAR NOT NULL         -- ended | idle
        );
        """,
    ),
    (
        "003_adapters",
        """
        ALTER TABLE spans ADD COLUMN adapter_version VARCHAR;  -- the adapter that served the call; null: base model
        CREATE TABLE adapters (
            version VARCHAR PRIMARY KEY,        -- v1, v2, ... never reused for other weights
            path VARCHAR NOT NULL,              -- the adapter folder (peft), copied into the adapters directory
            merged_path VARCHAR,                -- the base weights with it merged in (merged swap mode)
            parent VARCHAR,                     -- the version it was trained from
            algorithm VARCHAR,                  -- sft-filtered, kto, grpo, registered (by hand)...
            data JSON,                          -- where it came from: data window, hash, counts
            status VARCHAR NOT NULL,            -- candidate | canary | active | retired | failed
            served_name VARCHAR,                -- its LoRA name in vLLM (lw-<version>-<weights hash>)
            metrics JSON,                       -- evaluation results
            message VARCHAR,                    -- why it failed or was retired
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        "004_runs",
        """
        CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            status VARCHAR NOT NULL,            -- running | published | rejected | no_data | failed
            algorithm VARCHAR NOT NULL,
            parent VARCHAR,                     -- the version it started from (null: the base model)
            candidate VARCHAR,                  -- the adapter version it produced
            data JSON,                          -- window, records, splits, sha256 of the dataset file
            hyperparameters JSON,
            training JSON,                      -- losses, tokens, tokens per second, steps
            evaluation JSON,                    -- method, per-arm scores and counts
            reason VARCHAR,                     -- why it was published, rejected or failed
            started_at TIMESTAMPTZ NOT NULL,
            ended_at TIMESTAMPTZ
        );
        """,
    ),
    (
        "005_share",
        """
        -- Fleet mode (store.share): rows are shipped to the share in the order they were committed. One writer
        -- thread commits, so the rows of every table up to any value of this sequence are all committed.
        CREATE SEQUENCE share_seq;
        ALTER TABLE spans ADD COLUMN share_seq BIGINT DEFAULT nextval('share_seq');
        ALTER TABLE feedback ADD COLUMN share_seq BIGINT DEFAULT nextval('share_seq');
        ALTER TABLE sessions ADD COLUMN share_seq BIGINT DEFAULT nextval('share_seq');
        ALTER TABLE feedback ADD COLUMN response_id VARCHAR;  -- its target, when that call was not recorded here
        CREATE TABLE shipped (
            kind VARCHAR PRIMARY KEY,           -- spans | feedback | sessions
            seq BIGINT NOT NULL,                -- every row up to this share_seq is durably in the share
            segment VARCHAR NOT NULL,           -- the last segment written
            shipped_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE share_identity (
            sidecar_id VARCHAR NOT NULL         -- names this store's segments in the share; made once
        );
        CREATE TABLE imported (                 -- the learner: segments read from the share into this store
            segment VARCHAR PRIMARY KEY,
            rows BIGINT NOT NULL,
            imported_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        "006_span_sizes",
        """
        ALTER TABLE spans ADD COLUMN request_bytes BIGINT;   -- other /v1/ paths: the request body's size
        ALTER TABLE spans ADD COLUMN response_bytes BIGINT;  -- and the response body's, as relayed
        """,
    ),
    (
        # Counts a client or backend sends may exceed INTEGER ("max_tokens": 3000000000); a value even BIGINT
        # cannot hold is stored as NULL (store.rows), the raw value staying in the request or response JSON.
        # DuckDB alters a column's type only with no index on its table: the indexes are made again after.
        # sessions.end_reason gains "shutdown": sessions still open when the sidecar stopped.
        "007_wide_counts",
        """
        DROP INDEX spans_response_id;
        DROP INDEX spans_start_time;
        DROP INDEX spans_session_id;
        ALTER TABLE spans ALTER COLUMN request_max_tokens TYPE BIGINT;
        ALTER TABLE spans ALTER COLUMN usage_input_tokens TYPE BIGINT;
        ALTER TABLE spans ALTER COLUMN usage_output_tokens TYPE BIGINT;
        CREATE INDEX spans_response_id ON spans (response_id);
        CREATE INDEX spans_start_time ON spans (start_time);
        CREATE INDEX spans_session_id ON spans (session_id);
        """,
    ),
    (
        "008_memory",
        """
        ALTER TABLE spans ADD COLUMN memory_version VARCHAR;     -- the memory bank that gave the call examples
        ALTER TABLE spans ADD COLUMN memory_examples VARCHAR[];  -- the trajectories put in front of it (ids)
        CREATE TABLE memory_banks (
            version VARCHAR PRIMARY KEY,        -- m1, m2, ... never reused
            path VARCHAR NOT NULL,              -- the bank: one trajectory a line (JSONL)
            parent VARCHAR,                     -- the bank active when it was built
            data JSON,                          -- where it came from: data window, counts per model
            status VARCHAR NOT NULL,            -- candidate | canary | active | retired | failed
            metrics JSON,                       -- evaluation results
            message VARCHAR,                    -- why it failed or was retired
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        # An ART index stays in memory for the life of the process: the one on start_time held ~100 bytes a span
        # (58 MB of resident memory at 600,000 spans). Spans arrive in time order, so DuckDB's zone maps (min and
        # max per row group) already skip what a time range excludes: 1.7 ms for the last 10 s of 1M spans.
        "009_no_time_index",
        """
        DROP INDEX spans_start_time;
        """,
    ),
    (
        "010_upstream_duration",
        """
        -- model calls: from sending the request to the backend until its response's last byte (or the call's end,
        -- when that never came); duration_ms minus this is the time Lightwire added
        ALTER TABLE spans ADD COLUMN upstream_duration_ms DOUBLE;
        """,
    ),
    (
        # The index on the response ids stayed in memory, ~50 bytes a span, and the lookup it was for (the newest
        # call with a response id) never used it: lookups scan a 64-bit key of the id instead (store.idkeys).
        "011_response_key",
        f"""
        DROP INDEX spans_response_id;
        ALTER TABLE spans ADD COLUMN response_key UBIGINT;
        UPDATE spans SET response_key = {idkeys.sql("response_id")};
        """,
    ),
    (
        # The index on the spans' session ids stayed in memory too, ~45 bytes a call, for one lookup on the request
        # path: how many calls a named session had, when the proxy no longer held it. A session leaves the proxy's
        # memory only by ending (ended, idle, pushed out, shutdown; after a crash, at the next start), so its row
        # keeps that count, and its first call's time bounds a read of its spans (zone maps on start_time).
        "012_session_turns",
        """
        ALTER TABLE sessions ADD COLUMN turns BIGINT;             -- its model calls, as counted when it ended
        ALTER TABLE sessions ADD COLUMN started_at TIMESTAMPTZ;   -- its first call
        UPDATE sessions SET turns = calls.turns, started_at = calls.started_at
        FROM (SELECT session_id, count(turn_index) AS turns, min(start_time) AS started_at
              FROM spans WHERE session_id IS NOT NULL GROUP BY session_id) AS calls
        WHERE sessions.session_id = calls.session_id;
        DROP INDEX spans_session_id;
        """,
    ),
    (
        # The primary key on the span id alone was a tree of random keys: every batch touched all of it, so DuckDB
        # held it whole (~50 bytes a span) and every checkpoint grew dearer with the table. Keyed by start time
        # first, a batch touches only its newest edge, which is all DuckDB loads between checkpoints: its memory
        # and a checkpoint's cost stay flat as the table grows. A row is still written once (a retried batch or a
        # share's segment brings the same start time). Lookups by span id scan a 64-bit key of it (store.idkeys).
        "013_spans_by_time",
        f"""
        CREATE TABLE spans_by_time (
            span_id VARCHAR NOT NULL,
            trace_id VARCHAR NOT NULL,
            parent_span_id VARCHAR,
            session_id VARCHAR,
            operation_name VARCHAR NOT NULL,
            provider_name VARCHAR NOT NULL,
            request_model VARCHAR,
            response_model VARCHAR,
            response_id VARCHAR,
            request_stream BOOLEAN NOT NULL,
            request_max_tokens BIGINT,
            request_temperature DOUBLE,
            request_top_p DOUBLE,
            response_finish_reasons VARCHAR[],
            usage_input_tokens BIGINT,
            usage_output_tokens BIGINT,
            request JSON NOT NULL,
            response JSON,
            prompt_token_ids INTEGER[],
            completion_token_ids INTEGER[][],
            completion_logprobs FLOAT[][],
            start_time TIMESTAMPTZ NOT NULL,
            duration_ms DOUBLE NOT NULL,
            time_to_first_chunk_ms DOUBLE,
            http_status INTEGER,
            error_type VARCHAR,
            error_message VARCHAR,
            turn_index INTEGER,
            session_source VARCHAR,
            adapter_version VARCHAR,
            share_seq BIGINT DEFAULT nextval('share_seq'),
            request_bytes BIGINT,
            response_bytes BIGINT,
            memory_version VARCHAR,
            memory_examples VARCHAR[],
            upstream_duration_ms DOUBLE,
            response_key UBIGINT,
            span_key UBIGINT,                   -- 64 bits of the span id's MD5 (store.idkeys)
            PRIMARY KEY (start_time, span_id)
        );
        INSERT INTO spans_by_time BY NAME SELECT *, {idkeys.sql("span_id")} AS span_key FROM spans;
        DROP TABLE spans;
        ALTER TABLE spans_by_time RENAME TO spans;
        """,
    ),
    (
        # No query looks a feedback row up by its span id or session id alone (they are joined, or read with an
        # OR, which DuckDB answers by scanning), yet both indexes stayed in memory: ~120 bytes a feedback row.
        "014_feedback_unindexed",
        """
        DROP INDEX feedback_span_id;
        DROP INDEX feedback_session_id;
        """,
    ),
]


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply the migrations this database lacks; return the names applied."""
    con.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ)")
    done = {name for (name,) in con.execute("SELECT name FROM _migrations").fetchall()}
    applied = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(sql)
            con.execute("INSERT INTO _migrations VALUES (?, now())", [name])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
