-- Retention looks at a workspace's runs that ended before a cutoff, never at the others.
CREATE INDEX machina_runs_ended ON machina_runs (workspace, updated_at)
    WHERE state IN ('DONE', 'FAILED', 'CANCELLED');
