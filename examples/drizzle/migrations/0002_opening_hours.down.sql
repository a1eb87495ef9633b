DROP TABLE "opening_hours";
