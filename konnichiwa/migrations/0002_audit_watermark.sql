-- The highest sequence number up to which every audit row is present (rows 1..upto, no gap).
-- Consumers advance it in the transaction that inserts their batch, holding this row's lock,
-- so /logs can page by arithmetic on the dense sequence instead of OFFSET or count(*).
CREATE TABLE audit_watermark (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    upto bigint NOT NULL CHECK (upto >= 0)
);
INSERT INTO audit_watermark (upto) VALUES (0);
