-- The deployment this database belongs to: one environment and one Redis, which holds the same
-- random id under its `{konnichiwa:<environment>}:deployment` key. The service writes the row at
-- its first start and refuses to start where the environment or the Redis disagree
-- (postgres.claim): two environments, or two Redis, never write one audit log.
CREATE TABLE deployment (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    environment text NOT NULL,
    id text NOT NULL,
    bound_at timestamptz NOT NULL DEFAULT now()
);
