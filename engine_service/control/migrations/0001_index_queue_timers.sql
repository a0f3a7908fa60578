-- The run index, the work queue, execution slots and durable timers.
-- Times are seconds since the epoch, as in the runs' state documents.

CREATE TABLE machina_runs (
    workspace    text NOT NULL,
    run_id       text NOT NULL,
    state        text NOT NULL,
    pause_reason text,
    labels       jsonb NOT NULL DEFAULT '{}',
    created_at   double precision NOT NULL,
    updated_at   double precision NOT NULL,
    last_seq     bigint NOT NULL DEFAULT 0,
    -- The whole state document (state.json as last committed): ListRuns answers from it.
    doc          jsonb NOT NULL,
    PRIMARY KEY (workspace, run_id)
);
-- ListRuns: newest first within a workspace, keyset pages.
CREATE INDEX machina_runs_newest ON machina_runs (workspace, created_at DESC, run_id DESC);
-- The recovery sweep looks at runs that may need an executor, never at finished ones.
CREATE INDEX machina_runs_active ON machina_runs (state)
    WHERE state IN ('QUEUED', 'RUNNING') OR pause_reason = 'HANDOFF_TO_RUNNER';
CREATE INDEX machina_runs_labels ON machina_runs USING gin (labels);

-- Runs waiting for an executor, FIFO within a workspace.
CREATE TABLE machina_queue (
    seq         bigserial PRIMARY KEY,
    workspace   text NOT NULL,
    run_id      text NOT NULL,
    -- Set when only one replica may execute the run (it holds the run's credentials in memory).
    pinned_to   text,
    UNIQUE (workspace, run_id)
);
CREATE INDEX machina_queue_workspace ON machina_queue (workspace, seq);

-- One row per workspace that ever queued a run: claims lock it, so a workspace's limit holds.
CREATE TABLE machina_workspaces (
    workspace text PRIMARY KEY
);

-- Runs executing (or claimed to execute), by the replica that holds them.
CREATE TABLE machina_slots (
    workspace text NOT NULL,
    run_id    text NOT NULL,
    owner     text NOT NULL,
    taken_at  double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp()),
    PRIMARY KEY (workspace, run_id)
);

-- Due-time rows fired once by whichever replica claims them first.
CREATE TABLE machina_timers (
    workspace     text NOT NULL,
    run_id        text NOT NULL,
    kind          text NOT NULL,
    due_at        double precision NOT NULL,
    claim_token   text,
    claimed_until double precision,
    PRIMARY KEY (workspace, run_id, kind)
);
CREATE INDEX machina_timers_due ON machina_timers (due_at);
