"""The demo content in the admin: an embedding version's row failures link to these pages."""

from django.contrib import admin

from .models import Article


@admin.register(Article)
class ArticleAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "category")
    search_fields = ("title",)
