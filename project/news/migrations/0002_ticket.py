import uuid

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("news", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="Ticket",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True,
                                        serialize=False)),
                ("subject", models.CharField(blank=True, max_length=300)),
                ("raw_body", models.BinaryField(blank=True, null=True)),
            ],
        ),
    ]
