"""Coverage-over-time samples of each backfill run, for the admin's chart.

A BEFORE UPDATE trigger appends ``[unix_seconds, rows_processed]`` whenever a run's progress or
status changes, about once a second (every change of status too), so every writer (Celery
batches, inline batches, another process) is sampled without any change to the backfill code.
"""

from django.db import migrations, models

TRIGGER = """
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
            -- Less than a second after the previous sample: move the last one forward instead
            -- of adding one, so samples stay about a second apart and the last is current.
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

CREATE TRIGGER embeddings_app_backfillrun_sample
    BEFORE UPDATE ON embeddings_app_backfillrun
    FOR EACH ROW EXECUTE FUNCTION embeddings_app_backfillrun_sample();
"""

DROP_TRIGGER = """
DROP TRIGGER IF EXISTS embeddings_app_backfillrun_sample ON embeddings_app_backfillrun;
DROP FUNCTION IF EXISTS embeddings_app_backfillrun_sample();
"""


class Migration(migrations.Migration):

    dependencies = [
        ("embeddings_app", "0002_cutover_fields_permissions_failures"),
    ]

    operations = [
        migrations.AddField(
            model_name="backfillrun",
            name="progress_samples",
            field=models.JSONField(blank=True, default=list, editable=False),
        ),
        migrations.RunSQL(TRIGGER, DROP_TRIGGER),
    ]
