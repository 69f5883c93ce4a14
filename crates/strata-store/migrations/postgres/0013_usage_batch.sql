-- A batch's lines are metered like any request, but they run on spare
-- slots: the ledger keeps which rows they are (cost by class), and the
-- autoscaler's demand leaves them out.
ALTER TABLE usage ADD COLUMN batch BOOLEAN NOT NULL DEFAULT FALSE;
