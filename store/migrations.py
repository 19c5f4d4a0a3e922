"""The store's schema, as an ordered list of named migrations.

Each migration runs once, in order, inside a transaction, and is recorded in ``_migrations``. Never edit a
migration that has shipped: append a new one.

Span columns follow the OpenTelemetry GenAI semantic conventions: the column is the attribute name without its
``gen_ai.`` prefix, dots turned into underscores (``gen_ai.request.model`` -> ``request_model``);
:data:`store.spans.OTEL_ATTRIBUTES` holds the exact mapping.
"""

from __future__ import annotations

import duckdb

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
