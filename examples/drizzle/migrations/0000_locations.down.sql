DROP TABLE "locations";--> statement-breakpoint
DROP TYPE "public"."location_kind";
