# The last truncation measurement of a version (embeddings_app.truncation): a JSON object, {}
# until measured; adding it with a constant default rewrites no row (PostgreSQL 11+).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('embeddings_app', '0012_version_lineage'),
    ]

    operations = [
        migrations.AddField(
            model_name='embeddingversion',
            name='truncation',
            field=models.JSONField(blank=True, default=dict),
        ),
    ]
