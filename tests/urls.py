from django.contrib import admin
from django.urls import include, path

from tests.testapp.views import save_and_dispatch

urlpatterns = [
    path("admin/", admin.site.urls),
    path("aftercommit/", include("aftercommit.urls")),
    path("save/<str:token>/", save_and_dispatch),
]
