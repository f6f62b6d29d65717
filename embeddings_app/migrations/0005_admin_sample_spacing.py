"""Bound the coverage-over-time samples of long backfills (see 0003_admin_progress_samples).

Samples were kept about a second apart: a ten-hour run would carry 36,000 of them, rewritten with
its row on every batch. Now a new sample is kept only when at least max(1 s, elapsed / 300) has
passed since the previous one, so a run keeps a few hundred to under two thousand points (about
300 * ln(duration / 300 s) past the first five minutes), enough for a chart.
"""

from django.db import migrations

FUNCTION = """
CREATE OR REPLACE FUNCTION embeddings_app_backfillrun_sample() RETURNS trigger AS $$
DECLARE
    now_s double precision := extract(epoch FROM clock_timestamp());
    samples jsonb := COALESCE(NEW.progress_samples, '[]'::jsonb);
    n integer := jsonb_array_length(samples);
    gap double precision;
BEGIN
    IF NEW.rows_processed IS DISTINCT FROM OLD.rows_processed
       OR NEW.status IS DISTINCT FROM OLD.status THEN
        IF n >= 2 THEN
            gap := GREATEST(1.0, (now_s - (samples -> 0 ->> 0)::double precision) / 300.0);
        END IF;
        IF n >= 2 AND NEW.status IS NOT DISTINCT FROM OLD.status
           AND now_s - (samples -> (n - 2) ->> 0)::double precision < gap THEN
            -- Too soon after the previous sample: move the last one forward instead of adding
            -- one, so the last sample is always current.
            NEW.progress_samples := jsonb_set(
                samples, ARRAY[(n - 1)::text],
                jsonb_build_array(round(now_s::numeric, 3), NEW.rows_processed));
        ELSE
            NEW.progress_samples := samples
                || jsonb_build_array(jsonb_build_array(round(now_s::numeric, 3), NEW.rows_processed));
        END IF;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
"""

PREVIOUS = """
CREATE OR REPLACE FUNCTION embeddings_app_backfillrun_sample() RETURNS trigger AS $$
DECLARE
    now_s double precision := extract(epoch FROM clock_timestamp());
    samples jsonb := COALESCE(NEW.progress_samples, '[]'::jsonb);
    n integer := jsonb_array_length(samples);
BEGIN
    IF NEW.rows_processed IS DISTINCT FROM OLD.rows_processed
       OR NEW.status IS DISTINCT FROM OLD.status THEN
        IF n >= 2 AND NEW.status IS NOT DISTINCT FROM OLD.status
           AND now_s - (samples -> (n - 2) ->> 0)::double precision < 1.0 THEN
            NEW.progress_samples := jsonb_set(
                samples, ARRAY[(n - 1)::text],
                jsonb_build_array(round(now_s::numeric, 3), NEW.rows_processed));
        ELSE
            NEW.progress_samples := samples
                || jsonb_build_array(jsonb_build_array(round(now_s::numeric, 3), NEW.rows_processed));
        END IF;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
"""


class Migration(migrations.Migration):

    dependencies = [
        ("embeddings_app", "0004_backfill_batches"),
    ]

    operations = [migrations.RunSQL(FUNCTION, PREVIOUS)]
