# Shadow reads (embeddings_app.shadow): a rate per version, hourly aggregates per candidate.
# Adding a column with a constant default rewrites no row (PostgreSQL 11+).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('embeddings_app', '0013_version_truncation'),
    ]

    operations = [
        migrations.AddField(
            model_name='embeddingversion',
            name='shadow_rate',
            field=models.FloatField(default=0.0),
        ),
        migrations.CreateModel(
            name='ShadowBucket',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('hour', models.DateTimeField()),
                ('queries', models.PositiveIntegerField(default=0)),
                ('overlap_sum', models.FloatField(default=0.0)),
                ('rank_sum', models.FloatField(default=0.0)),
                ('rank_queries', models.PositiveIntegerField(default=0)),
                ('served_seconds', models.FloatField(default=0.0)),
                ('candidate_seconds', models.FloatField(default=0.0)),
                ('unranked_rows', models.PositiveIntegerField(default=0)),
                ('version', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='shadow_buckets', to='embeddings_app.embeddingversion')),
            ],
            options={
                'ordering': ['version', 'hour'],
                'constraints': [models.UniqueConstraint(fields=('version', 'hour'), name='embeddings_one_shadow_bucket_per_hour')],
            },
        ),
    ]
