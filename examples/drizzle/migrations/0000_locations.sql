CREATE TYPE "public"."location_kind" AS ENUM('restaurant', 'warehouse');--> statement-breakpoint
CREATE TABLE "locations" (
	"id" serial PRIMARY KEY NOT NULL,
	"name" text NOT NULL,
	"kind" "location_kind" DEFAULT 'restaurant' NOT NULL,
	CONSTRAINT "locations_name_unique" UNIQUE("name")
);
--> statement-breakpoint
INSERT INTO "locations" ("name", "kind") VALUES ('Main Street', 'restaurant'), ('Harbour', 'restaurant'), ('Depot', 'warehouse');
