-- Users, numbered densely by `position` (1, 2, 3 ... in creation order) so pages are range scans.
-- `user_count` hands out positions: taking its row lock serialises creations, and a failed insert
-- (a duplicate email) rolls its position back, leaving no gap.
CREATE TABLE users (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    position bigint NOT NULL UNIQUE CHECK (position > 0),
    name text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    email text NOT NULL CHECK (char_length(email) <= 254),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_unique ON users (lower(email));

CREATE TABLE user_count (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    total bigint NOT NULL CHECK (total >= 0)
);
INSERT INTO user_count (total) VALUES (0);
